"""The fidelity guard: keep the most sensitive linear layers in float until the quantized
model's output cosine reaches `min_cosine` on calibration samples the quantization numbers
were not fitted to (the held-out part, quantization.holdout; a cosine on the fitted
samples flatters fitted scales, and the pass reports it only beside this one).

Sensitivity of a layer = the output cosine with only that layer quantized (lower = more
sensitive). Starting from everything quantized, layers go back to float in order of
sensitivity, one at a time, until the whole model meets the bar. The evaluation is a
callable (the pass builds and runs the candidate graph), so the policy is testable on its
own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

#: quantized layer indices -> output cosine (min over outputs of the mean over samples)
Evaluate = Callable[[frozenset[int]], float]


@dataclass
class GuardResult:
    quantized: frozenset[int]
    kept_float: list[int]  # most sensitive first
    sensitivity: dict[int, float] = field(default_factory=dict)
    cosine: float = 1.0  # of the final choice
    cosine_all_quantized: float = 1.0


def choose_float_layers(candidates: Sequence[int], evaluate: Evaluate, min_cosine: float | None,
                        advance: Callable[[], None] = lambda: None) -> GuardResult:
    """Which of `candidates` to quantize so that the output cosine is ≥ min_cosine (None:
    no bar, all of them, evaluated once).

    Evaluates all-quantized first; only when that misses the bar does it measure each
    layer's sensitivity (len(candidates) evaluations) and then put layers back to float,
    most sensitive first. `advance` is called after every evaluation (progress)."""
    everything = frozenset(candidates)
    cosine = evaluate(everything)
    advance()
    result = GuardResult(everything, [], {}, cosine, cosine)
    if min_cosine is None or cosine >= min_cosine:
        return result
    for index in candidates:
        result.sensitivity[index] = evaluate(frozenset({index}))
        advance()
    order = sorted(candidates, key=lambda i: (result.sensitivity[i], i))
    quantized = set(everything)
    for index in order:
        quantized.discard(index)
        result.kept_float.append(index)
        cosine = evaluate(frozenset(quantized)) if quantized else 1.0
        advance()
        if cosine >= min_cosine:
            break
    result.quantized, result.cosine = frozenset(quantized), cosine
    return result
