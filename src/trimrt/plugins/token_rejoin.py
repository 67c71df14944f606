"""TokenRejoin: the tokens a routed layer ran on rejoin the tokens it skipped, in place.

Mixture-of-Depths routing (p-MoD) runs a layer on the top-k tokens of a span only; the
other tokens skip the layer and keep their state. TokenPrune gathers the routed tokens
before the layer; TokenRejoin puts the layer's outputs back at their original positions
after it:

    out = x;  out[b, index[b, m]] = y[b, m]

x [B, N, D] is the stream entering the layer (the skipped tokens' output; with a trained
router, p-MoD's STRing weight times that stream), y [B, M, D] the routed
tokens after the layer, index [B, M] their positions (each once per row). Nothing is reduced: a plain scatter, exact and TensorRT-safe.

The decomposition is one ScatterElements over the token axis: a copy of x and M rows
written, so the routed layer's saving is kept.
"""

from __future__ import annotations

import numpy as np

from .base import OpDef, TensorSpec

NAME = "TokenRejoin"


def reference(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> tuple[np.ndarray]:
    if x.ndim != 3 or y.ndim != 3 or index.shape != y.shape[:2] or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"TokenRejoin: need x [B, N, D], y [B, M, D] and index [B, M], got {x.shape}, {y.shape}, "
                         f"{index.shape}")
    if index.size and (index.min() < 0 or index.max() >= x.shape[1]):
        raise ValueError(f"TokenRejoin: an index is outside the {x.shape[1]} tokens")
    if any(len(np.unique(row)) != len(row) for row in index):
        raise ValueError("TokenRejoin: an index appears twice in a row; each routed token has one position")
    out = x.copy()
    np.put_along_axis(out, index[:, :, None].astype(np.int64), y.astype(x.dtype), axis=1)
    return (out,)


def decompose(b, x, y, index):
    where = b.Expand(b.Unsqueeze(index, b.const([-1])), b.Shape(y))  # [B, M, D]: every feature of each routed row
    return b.ScatterElements(x, where, y, axis=1)


def examples(rng):
    """Routed rows in order and shuffled, all tokens routed, one token, batch > 1, D = 1."""
    cases = []
    for batch, n, m, d, shuffled in [(2, 9, 4, 5, False), (1, 6, 6, 3, True), (3, 7, 1, 2, False), (2, 10, 5, 1, True)]:
        x = rng.standard_normal((batch, n, d)).astype(np.float32)
        y = rng.standard_normal((batch, m, d)).astype(np.float32)
        rows = [rng.permutation(n)[:m] for _ in range(batch)]
        index = np.stack([r if shuffled else np.sort(r) for r in rows]).astype(np.int64)
        cases.append(([x, y, index], {}))
    return cases


OP = OpDef.of_module(
    __name__,
    inputs=(
        TensorSpec("x", "the tokens entering the routed layer [B, N, D] (what skipped tokens keep)"),
        TensorSpec("y", "the routed tokens after the layer [B, M, D]"),
        TensorSpec("index", "the routed tokens' positions in x [B, M], each once per row", "int64"),
    ),
    outputs=(TensorSpec("out", "x with the routed rows replaced by y [B, N, D]"),),
    attributes=(),
)
