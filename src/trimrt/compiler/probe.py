"""Which axes of which tensors are token axes, when shapes alone cannot tell.

Exports with a dynamic token count name that dimension inconsistently (the TorchScript
exporter leaves `unk__7`-style symbols that shape inference cannot relate), so a mask's
token axes cannot be matched to the residual stream's by name. The probe runs the
model once on ONNX Runtime with an unusual token count and a small batch, exposing
the values asked for, and reads their real shapes: an axis of size PROBE_TOKENS is a
token axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..plugins import DOMAIN, runnable_proto
from ..runtime.feeds import random_feeds
from .input_limits import INPUT_LIMITS, find_input_limits
from .onnx_runner import OnnxRunner

PROBE_TOKENS = 37
PROBE_BATCH = 3


class TokenDims:
    """Token axes of values: by static size or symbol when the graph says, else by probing.

    A static token count is matched by size on the graph's shapes; values whose shapes
    shape inference left partly unknown (TorchScript exports with a dynamic batch and a
    fixed length) are probed: the model runs at its own fixed length and an axis of
    that size is a token axis. `shared` (a compile's shared values): see probe_shapes."""

    def __init__(self, model: ir.Model, n_tokens: int | str, shared: dict | None = None):
        self.n_tokens = n_tokens
        probe = not isinstance(n_tokens, int) or any(_partial(out.shape) for node in model.graph for out in node.outputs)
        self.shapes: dict[str, tuple[int, ...]] = probe_shapes(model, shared) if probe else {}

    def shape(self, value: ir.Value) -> tuple | None:
        """The value's shape in the original graph: static from the graph, else probed."""
        if isinstance(self.n_tokens, int) and value.shape is not None and not _partial(value.shape):
            return tuple(value.shape)
        return self.shapes.get(value.name)

    def rank(self, value: ir.Value) -> int | None:
        shape = value.shape if value.shape is not None else self.shapes.get(value.name)
        return None if shape is None else len(shape)

    @property
    def token_size(self) -> int:
        """The size of a token axis in the shapes read here (the probe's count when dynamic)."""
        return self.n_tokens if isinstance(self.n_tokens, int) else PROBE_TOKENS

    def axes(self, value: ir.Value) -> list[int]:
        """Axes (beyond the batch axis) of `value` that run over the tokens."""
        shape = self.shape(value) or ()
        return [a for a in range(1, len(shape)) if shape[a] == self.token_size]


def _partial(shape) -> bool:
    """A shape with an unknown rank or an axis that is not a number."""
    return shape is None or not all(isinstance(d, int) for d in shape)


#: key of the last shape probe in a compile's shared values (PipelineContext.shared)
PROBED = "probed_shapes"


def _probed_names(model: ir.Model) -> list[str]:
    """The values a probe exposes: outputs whose shape is not fully static, and the inputs."""
    outputs = [out.name for node in model.graph for out in node.outputs if out.name and _partial(out.shape)]
    return outputs + [v.name for v in model.graph.inputs]


def wiring(graph: ir.Graph) -> tuple:
    """The graph as analysis sees it: its nodes, what each reads, its inputs and outputs."""
    return tuple(graph.inputs), tuple(graph.outputs), tuple((n, tuple(n.inputs)) for n in graph)


def once(shared: dict, name: str, key, compute):
    """compute(), kept in `shared` (a compile's shared values) under `name` and reused
    while `key` (e.g. the graph's wiring) is the one it was computed for."""
    found = shared.get(name)
    if found is None or found[0] != key:
        found = shared[name] = (key, compute())
    return found[1]


def probe_shapes(model: ir.Model, shared: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every non-constant value whose shape is not fully static. With
    `shared` (a compile's shared values) the feeds keep to the original model's input
    limits, and the probe is run once per graph: reused while the graph is wired (and
    its shapes known) as when it was probed, by analysis and the passes after it."""
    if shared is None:
        return probe_shape_runs(model, [(PROBE_BATCH, PROBE_TOKENS)])[0]
    from .decoder import DECODER_SPEC

    key = (wiring(model.graph), tuple(_probed_names(model)))
    return once(shared, PROBED, key, lambda: probe_shape_runs(model, [(PROBE_BATCH, PROBE_TOKENS)],
                                                              shared.get(INPUT_LIMITS), shared.get(DECODER_SPEC))[0])


def probe_shape_runs(model: ir.Model, runs: list[tuple[int, int]], limits: dict | None = None,
                     decoder=None) -> list[dict[str, tuple[int, ...]]]:
    """probe_shapes for each (batch, tokens) of `runs`, from one ONNX Runtime session;
    random ids kept inside `limits` (the model's input limits; found on `model` if None).
    A KV-cache `decoder` (its DecoderSpec) runs a prefill: `tokens` new ones on an empty past."""
    proto = ir.serde.serialize_model(model)
    if any(node.domain == DOMAIN for node in model.graph.all_nodes()):  # a graph a token pass has rewritten
        proto = runnable_proto(proto)
    runner = OnnxRunner(proto, _probed_names(model), optimize="disable")
    if limits is None:
        limits = find_input_limits(proto)  # token ids inside a small vocabulary

    def feeds(batch: int, tokens: int) -> dict[str, np.ndarray]:
        if decoder is not None:
            return decoder.random_feeds(batch, new=tokens, past=0)
        return random_feeds(runner.inputs, batch=batch, seed=0, tokens=tokens, limits=limits)

    outputs = (runner.run(feeds(batch, tokens)) for batch, tokens in runs)
    return [{n: tuple(np.shape(v)) for n, v in values.items()} for values in outputs]


def annotate_unknown_dims(model: ir.Model, limits: dict | None = None) -> int:
    """Fill in the axes shape inference left unknown, from two probe runs of different
    batch and token counts: an axis of the same size in both is static, one that differs
    follows the input's size (one symbol per pair of sizes, so the axes that follow the
    same count share it). Pattern rewrites need these: after a token-reducing op the
    exporter's [B, N, -1, d] reshapes lose their head count. The model must run on ONNX
    Runtime (custom ops' decompositions attached); `limits`: see probe_shape_runs. Returns
    the number of values changed."""
    first, second = probe_shape_runs(model, [(PROBE_BATCH, PROBE_TOKENS), (PROBE_BATCH + 2, PROBE_TOKENS + 16)],
                                     limits)
    changed = 0
    for node in model.graph:
        for value in node.outputs:
            a, b, old = first.get(value.name), second.get(value.name), value.shape
            if a is None or b is None or len(a) != len(b) or (old is not None and len(old) != len(a)):
                continue
            dims = list(old) if old is not None else [None] * len(a)
            for axis, (x, y) in enumerate(zip(a, b)):
                if unknown_dim(dims[axis]):
                    dims[axis] = x if x == y else ("batch" if (x, y) == (PROBE_BATCH, PROBE_BATCH + 2) else f"n{x}_{y}")
            shape = ir.Shape(dims)
            if old is None or list(old) != list(shape):
                value.shape = shape
                changed += 1
    return changed


def unknown_dim(dim) -> bool:
    """A dimension shape inference could not relate to anything (None, or unk__N)."""
    name = getattr(dim, "value", dim)
    return name is None or str(name).startswith("unk__")
