"""TokenRecycle: NumPy reference semantics, ONNX decomposition on ORT == reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins.base import FUNCTION_OPSET
from trimrt.plugins.token_prune import select, span_keep

OP = REGISTRY["TokenRecycle"]
_ONNX_TYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.int64): onnx.TensorProto.INT64}


def run_decomposition(inputs: list[np.ndarray], **attrs) -> list[np.ndarray]:
    names = [t.name for t in OP.inputs]
    node = oh.make_node(OP.name, names, [t.name for t in OP.outputs], domain=DOMAIN, **attrs)
    graph = oh.make_graph(
        [node], "one_op",
        [oh.make_tensor_value_info(n, _ONNX_TYPES[a.dtype], list(a.shape)) for n, a in zip(names, inputs)],
        [oh.make_tensor_value_info(t.name, onnx.TensorProto.INT64 if t.dtype == "int64" else onnx.TensorProto.FLOAT,
                                   None) for t in OP.outputs],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", FUNCTION_OPSET), oh.make_opsetid(DOMAIN, 1)],
                          functions=[OP.function()])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, inputs)))


def _positions(kind: str, b: int, n: int, protect: int, end: int, rows: int, cols: int, first: int, rng):
    """Original patch positions of the tokens: the span holds patches, the rest is not."""
    span = end - protect
    pos = np.full((b, n), first - 1, dtype=np.int64)  # e.g. CLS at 0 when first == 1
    if kind == "contiguous":
        pos[:, protect:end] = first + np.arange(span)
    else:  # after an earlier prune: a sorted random subset of the layout, per sample
        for i in range(b):
            pos[i, protect:end] = first + np.sort(rng.choice(rows * cols, size=span, replace=False))
    pos[:, end:] = first + rows * cols + np.arange(n - end)  # text after the image: no cell
    return pos


def _check(x, score, position, **attrs):
    got = run_decomposition([x, score, position], **attrs)
    want = OP.run_reference(x, score, position, **attrs)
    b, n, d = x.shape
    end = attrs.get("span_end", 0) or n
    protect = attrs.get("protect", 0)
    k = span_keep(end - protect, attrs["keep"], attrs.get("keep_ratio", 1.0))
    m = protect + k + attrs["grid"] ** 2 + n - end
    assert want[0].shape == got[0].shape == (b, m, d) and got[0].dtype == x.dtype
    assert want[1].shape == got[1].shape == (b, m) and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    # the pruned part is TokenPrune's selection exactly, and a pure gather
    kept = select(score, k, protect, end)
    cells = slice(protect + k, protect + k + attrs["grid"] ** 2)
    np.testing.assert_array_equal(np.delete(got[1], cells, axis=1), kept)
    np.testing.assert_array_equal(np.delete(got[0], cells, axis=1), np.take_along_axis(x, kept[:, :, None], axis=1))
    return got


CASES = [  # (batch, d, keep, protect, extra_suffix, ratio, grid, rows, cols, first_patch, positions)
    (2, 5, 6, 1, 0, 1.0, 2, 4, 4, 1, "contiguous"),  # 4x4 behind a CLS
    (3, 8, 1, 1, 0, 1.0, 2, 4, 4, 1, "contiguous"),  # k = 1
    (2, 4, 16, 0, 0, 1.0, 2, 4, 4, 0, "contiguous"),  # keep = all, no CLS: cells are members' means
    (2, 4, 16, 1, 0, 1.0, 3, 4, 4, 1, "contiguous"),  # keep = all, uneven 3x3 cells on 4x4
    (2, 6, 5, 0, 0, 1.0, 1, 4, 4, 0, "contiguous"),  # grid 1: one global cell
    (2, 6, 7, 1, 0, 1.0, 4, 4, 4, 1, "contiguous"),  # grid = layout: one patch per cell
    (2, 8, 60, 1, 0, 1.0, 3, 14, 14, 1, "contiguous"),  # ViT-B/16: 14x14 behind a CLS
    (3, 8, 98, 1, 0, 1.0, 2, 14, 14, 1, "contiguous"),
    (2, 8, 0, 1, 0, 0.3, 3, 14, 14, 1, "contiguous"),  # k from keep_ratio at run time
    (2, 8, 1, 0, 0, 1.0, 3, 14, 14, 0, "contiguous"),  # k = 1, no CLS
    (2, 6, 20, 1, 0, 1.0, 3, 14, 14, 1, "subset"),  # positions after an earlier prune
    (3, 6, 4, 1, 0, 1.0, 2, 4, 4, 1, "subset"),  # ... on 4x4: some cells empty
    (2, 6, 3, 0, 0, 1.0, 3, 4, 4, 1, "subset"),
    (2, 5, 5, 2, 6, 1.0, 2, 4, 4, 0, "contiguous"),  # a system prefix of 2, an image, 6 text tokens
    (2, 5, 3, 3, 4, 1.0, 3, 14, 14, 1, "subset"),  # pruned image inside a longer sequence
    (2, 5, 4, 1, 0, 1.0, 2, 3, 5, 1, "contiguous"),  # non-square layout, odd N
    (1, 3, 0, 1, 0, 0.5, 2, 2, 6, 1, "contiguous"),  # non-square, ratio
]


@pytest.mark.parametrize("b, d, keep, protect, suffix, ratio, grid, rows, cols, first, kind", CASES)
def test_decomposition_matches_reference(b, d, keep, protect, suffix, ratio, grid, rows, cols, first, kind):
    rng = np.random.default_rng(keep + 7 * grid + rows)
    span = rows * cols if kind == "contiguous" else max(keep + 5, 8) if keep else rows * cols // 2
    n = protect + span + suffix
    end = protect + span
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = rng.random((b, n)).astype(np.float32)
    position = _positions(kind, b, n, protect, end, rows, cols, first, rng)
    attrs = dict(keep=keep, protect=protect, span_end=end if suffix else 0, keep_ratio=ratio, grid=grid,
                 patch_rows=rows, patch_cols=cols, first_patch=first)
    _check(x, score, position, **attrs)


@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize("keep", [1, 5, 15])
def test_ties_and_zero_scores(grid, keep):
    """Few distinct scores (ties go to the lower index, in the selection and for the
    representatives), a sample with all-zero scores (plain member means) and one with
    zero scores on the dropped tokens only."""
    rng = np.random.default_rng(grid * 10 + keep)
    b, n, d = 4, 17, 3
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = (rng.integers(0, 3, size=(b, n)) / 2).astype(np.float32)
    score[1] = 0.0
    score[2] = 0.5
    position = _positions("contiguous", b, n, 1, n, 4, 4, 1, rng)
    attrs = dict(keep=keep, protect=1, grid=grid, patch_rows=4, patch_cols=4)
    y, kept_index = _check(x, score, position, **attrs)
    cells = slice(1 + keep, 1 + keep + grid * grid)
    if grid == 1:  # one cell of every patch: all zero weights -> plain mean of all members
        np.testing.assert_allclose(y[1, cells][0], x[1, 1:].mean(axis=0), rtol=1e-5, atol=1e-6)
        if keep < 16:  # the first dropped token represents the cell: the span's (k+1)-th token
            assert kept_index[1, cells][0] == 1 + keep and kept_index[2, cells][0] == 1 + keep


def test_reference_semantics_by_hand():
    """A 2x2 layout (patches 1..4 behind a CLS), grid 2: one patch per cell."""
    x = np.arange(5, dtype=np.float32).reshape(1, 5, 1) * 10
    score = np.array([[0.0, 0.1, 0.9, 0.0, 0.4]], np.float32)
    position = np.arange(5, dtype=np.int64)[None]
    y, kept = OP.run_reference(x, score, position, keep=2, protect=1, grid=2, patch_rows=2, patch_cols=2)
    # kept: CLS, tokens 2 and 4; cells: token 1 (dropped), 2 (kept: its own value), 3 (dropped,
    # zero score: plain mean of its members = itself), 4 (kept)
    assert kept.tolist() == [[0, 2, 4, 1, 2, 3, 4]]
    assert y[0, :, 0].tolist() == [0, 20, 40, 10, 20, 30, 40]
    # grid 1: the dropped tokens 1 and 3 merge by score: (0.1 · 10 + 0 · 30) / 0.1
    y, kept = OP.run_reference(x, score, position, keep=2, protect=1, grid=1, patch_rows=2, patch_cols=2)
    assert kept.tolist() == [[0, 2, 4, 1]]
    np.testing.assert_allclose(y[0, :, 0], [0, 20, 40, 10], rtol=1e-6)
    got = run_decomposition([x, score, position], keep=2, protect=1, grid=1, patch_rows=2, patch_cols=2)
    np.testing.assert_allclose(got[0], y, rtol=1e-6)


def test_cells_of_a_14x14_layout():
    """3x3 cells on 14x14: rows/cols 0-4, 5-9, 10-13 (r · 3 // 14)."""
    from trimrt.plugins.token_recycle import cell_of

    p = np.arange(196)
    cell = cell_of(p + 1, grid=3, patch_rows=14, patch_cols=14, first_patch=1)
    row, col = p // 14, p % 14
    band = np.select([row < 5, row < 10], [0, 1], 2) * 3 + np.select([col < 5, col < 10], [0, 1], 2)
    np.testing.assert_array_equal(cell, band)
    assert np.bincount(cell).tolist() == [25, 25, 20, 25, 25, 20, 20, 20, 16]
    assert cell_of(np.array([0, 197, -5]), grid=3, patch_rows=14, patch_cols=14, first_patch=1).tolist() == [-1] * 3


def test_empty_cells_and_non_patches_in_the_span():
    """Only the top half of a 4x4 layout survived an earlier prune, and the CLS (position
    0) is inside the span: the bottom cells are zeros represented by index `protect`, the
    CLS joins no cell."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 9, 4)).astype(np.float32)
    score = rng.random((2, 9)).astype(np.float32)
    score[:, 0] = 0.0  # the CLS is dropped...
    position = np.broadcast_to(np.arange(9, dtype=np.int64), (2, 9)).copy()
    attrs = dict(keep=3, protect=0, grid=2, patch_rows=4, patch_cols=4, first_patch=1)
    y, kept_index = _check(x, score, position, **attrs)
    cells_y, cells_i = y[:, 3:7], kept_index[:, 3:7]
    np.testing.assert_array_equal(cells_y[:, 2:], 0.0)
    np.testing.assert_array_equal(cells_i[:, 2:], 0)
    assert not np.any(cells_i[:, :2] == 0)  # ...but represents no cell


@pytest.mark.parametrize("grid, rows, cols", [(0, 4, 4), (5, 4, 4), (3, 2, 6), (-1, 4, 4), (1, 0, 4)])
def test_rejects_a_grid_that_does_not_fit(grid, rows, cols):
    x = np.zeros((1, 5, 2), np.float32)
    with pytest.raises(ValueError, match="grid|layout"):
        OP.run_reference(x, np.zeros((1, 5), np.float32), np.arange(5)[None], keep=2, protect=1, grid=grid,
                         patch_rows=rows, patch_cols=cols)


def test_rejects_bad_keep_and_span():
    x, s, p = np.zeros((1, 5, 2), np.float32), np.zeros((1, 5), np.float32), np.arange(5)[None]
    with pytest.raises(ValueError, match="keep=5 must be in"):
        OP.run_reference(x, s, p, keep=5, protect=1, grid=1, patch_rows=2, patch_cols=2)
    with pytest.raises(ValueError, match="span"):
        OP.run_reference(x, s, p, keep=1, protect=5, grid=1, patch_rows=2, patch_cols=2)


def test_keep_all_gives_member_means():
    """Nothing dropped: every cell token is the plain mean of its patches, represented by
    its highest-scoring patch."""
    rng = np.random.default_rng(11)
    b, rows, cols, grid = 2, 14, 14, 3
    n = 1 + rows * cols
    x = rng.standard_normal((b, n, 4)).astype(np.float32)
    score = rng.random((b, n)).astype(np.float32)
    position = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n))
    attrs = dict(keep=n - 1, protect=1, grid=grid, patch_rows=rows, patch_cols=cols)
    y, kept_index = _check(x, score, position, **attrs)
    from trimrt.plugins.token_recycle import cell_of

    cell = cell_of(position[0, 1:], grid=grid, patch_rows=rows, patch_cols=cols, first_patch=1)
    for c in range(grid * grid):
        members = np.flatnonzero(cell == c) + 1
        np.testing.assert_allclose(y[:, n + c], x[:, members].mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(kept_index[:, n + c], members[np.argmax(score[:, members], axis=1)])
