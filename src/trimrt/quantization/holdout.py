"""Which calibration samples fit the quantization numbers and which check them.

Fidelity is measured on data the build never saw (DESIGN.md, Measuring): a cosine on the
samples SmoothQuant's α, AWQ's scales or GPTQ's rounding were fitted to flatters them (an α
fitted on short sentences certified 0.998 and gave 0.98 on 256-token passages). So one
sample in HELD_OUT_EVERY is held out: the longest ones, where fitted scales break (positions
and outliers the fit never saw), and among equal lengths every HELD_OUT_EVERY-th, so an
ordered source splits alike; deterministic, so a build is reproducible. The held-out part
checks each fitted choice against round-to-nearest and is where the guard applies
`min_cosine`. Below MIN_SPLIT_SAMPLES samples (a quarter would be a noisy check that also
weakens the fit) nothing is held out, a warning says so, and the report says
`"measured_on": "fit"`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Generic, Mapping, Sequence, TypeVar

import numpy as np

log = logging.getLogger(__name__)

#: one calibration sample in this many is held out of fitting
HELD_OUT_EVERY = 4
#: fewer samples than this are not split (see the module docstring)
MIN_SPLIT_SAMPLES = 8

T = TypeVar("T")


@dataclass(frozen=True)
class Split(Generic[T]):
    fit: list[T]
    held_out: list[T]  # empty: too few samples to split

    @property
    def measured_on(self) -> str:
        """Where the guard measures: "held-out", or "fit" when nothing was held out."""
        return "held-out" if self.held_out else "fit"


def split_samples(samples: Sequence[T], size: Callable[[T], int] | None = None) -> Split[T]:
    """Hold out len(samples) // HELD_OUT_EVERY samples: the largest by (size, i % HELD_OUT_EVERY
    == HELD_OUT_EVERY - 1, i); each part keeps the samples' order. No split below
    MIN_SPLIT_SAMPLES samples (logged as a warning). `size` defaults to `sample_tokens`."""
    samples = list(samples)
    if len(samples) < MIN_SPLIT_SAMPLES:
        if samples:
            log.warning("quantization: %d calibration samples are too few to hold some back (%d or more are "
                        "needed): the fitted choices are not checked and the fidelity guard measures on the very "
                        "samples the numbers were fitted to", len(samples), MIN_SPLIT_SAMPLES)
        return Split(samples, [])
    size = size or sample_tokens
    sizes = [size(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (sizes[i], i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1, i))
    held = set(order[len(samples) - len(samples) // HELD_OUT_EVERY:])
    return Split([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def sample_tokens(feed: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a feed (the attention mask's count), else its largest input's size."""
    mask = feed.get("attention_mask")
    if mask is not None:
        return int(np.count_nonzero(mask))
    return max((int(np.size(v)) for v in feed.values()), default=0)
