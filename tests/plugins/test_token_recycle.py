"""TokenRecycle: reference semantics; decomposition on ORT, Triton kernel (interpreter on
CPU, see conftest.py) and TensorRT plugin (`gpu`) == the NumPy reference; the plugin hooks
against a fake tensorrt."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest

from tests.plugins.op_testing import (
    Dim,
    FakeDesc,
    aot_supported,
    check_compiles_to_ptx,
    fake_tensorrt,
    one_node_model,
    run_decomposition,
    run_tensorrt,
    run_triton,
    to_torch,
    value,
)
from trimrt.plugins import REGISTRY
from trimrt.plugins import tensorrt_glue as glue
from trimrt.plugins.token_prune import select, span_keep

OP = REGISTRY["TokenRecycle"]
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
    got = run_decomposition(OP, [x, score, position], **attrs)
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
    got = run_decomposition(OP, [x, score, position], keep=2, protect=1, grid=1, patch_rows=2, patch_cols=2)
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


# --------------------------------------------------------- Triton kernel (interpreter)


def _check_kernel(x, score, position, device, **attrs):
    y, kept_index = run_triton(OP, [x, score, position], device, **attrs)
    want = OP.run_reference(x, score, position, **attrs)
    assert y.shape == want[0].shape and y.dtype == x.dtype
    assert kept_index.shape == want[1].shape and kept_index.dtype == np.int64
    np.testing.assert_array_equal(kept_index, want[1])
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-6)
    return y, kept_index


KERNEL_CASES = [  # (batch, d, keep, protect, suffix, ratio, grid, rows, cols, first_patch, positions)
    (2, 5, 6, 1, 0, 1.0, 2, 4, 4, 1, "contiguous"),
    (3, 8, 1, 1, 0, 1.0, 3, 4, 4, 1, "contiguous"),  # k = 1
    (2, 4, 16, 0, 0, 1.0, 2, 4, 4, 0, "contiguous"),  # keep = all, no CLS
    (2, 40, 5, 1, 0, 1.0, 1, 4, 4, 1, "contiguous"),  # two feature blocks, grid 1
    (2, 1, 9, 1, 0, 1.0, 4, 4, 4, 1, "contiguous"),  # D = 1; 16 cells: one full chunk
    (2, 3, 10, 1, 0, 1.0, 5, 5, 5, 1, "contiguous"),  # 25 cells: two chunks
    (1, 3, 12, 1, 0, 1.0, 6, 6, 6, 1, "subset"),  # 36 cells, some empty
    (2, 8, 60, 1, 0, 1.0, 3, 14, 14, 1, "contiguous"),  # ViT-B/16: span over several chunks
    (2, 6, 20, 1, 0, 1.0, 3, 14, 14, 1, "subset"),  # positions after an earlier prune
    (2, 5, 5, 2, 6, 1.0, 2, 4, 4, 0, "contiguous"),  # prefix, image span, text suffix
    (2, 8, 0, 1, 0, 0.5, 2, 3, 5, 1, "contiguous"),  # keep_ratio at run time, non-square
]


@pytest.mark.parametrize("b, d, keep, protect, suffix, ratio, grid, rows, cols, first, kind", KERNEL_CASES)
def test_kernel_matches_reference(b, d, keep, protect, suffix, ratio, grid, rows, cols, first, kind, device):
    rng = np.random.default_rng(keep + 7 * grid + rows + d)
    span = rows * cols if kind == "contiguous" else max(keep + 5, 8)
    n, end = protect + span + suffix, protect + span
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = rng.random((b, n)).astype(np.float32)
    position = _positions(kind, b, n, protect, end, rows, cols, first, rng)
    _check_kernel(x, score, position, device, keep=keep, protect=protect, span_end=end if suffix else 0,
                  keep_ratio=ratio, grid=grid, patch_rows=rows, patch_cols=cols, first_patch=first)


@pytest.mark.parametrize("grid, keep", [(1, 1), (2, 5), (3, 15), (2, 16)])
def test_kernel_ties_zero_scores_and_non_patches(grid, keep, device):
    """Ties, all-zero scores, zero scores on the dropped tokens, and a CLS inside the span."""
    rng = np.random.default_rng(grid + keep)
    b, n, d = 4, 17, 3
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = (rng.integers(0, 3, size=(b, n)) / 2).astype(np.float32)
    score[1] = 0.0
    score[2] = 0.5
    position = _positions("contiguous", b, n, 1, n, 4, 4, 1, rng)
    _check_kernel(x, score, position, device, keep=keep, protect=1, grid=grid, patch_rows=4, patch_cols=4)
    _check_kernel(x, score, position, device, keep=keep, protect=0, grid=grid, patch_rows=4, patch_cols=4)


def test_kernel_empty_batch_no_features_and_out_buffers(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    attrs = dict(keep=3, protect=1, grid=2, patch_rows=3, patch_cols=3)
    score = rng.random((2, 10)).astype(np.float32)
    position = np.broadcast_to(np.arange(10), (2, 10))
    y, kept_index = run_triton(OP, [np.zeros((2, 10, 0), np.float32), score, position], device, **attrs)
    assert y.shape == (2, 8, 0)
    np.testing.assert_array_equal(kept_index, OP.run_reference(np.zeros((2, 10, 1), np.float32), score, position,
                                                               **attrs)[1])
    y, kept_index = run_triton(OP, [np.zeros((0, 10, 4), np.float32), score[:0], position[:0]], device, **attrs)
    assert y.shape == (0, 8, 4) and kept_index.shape == (0, 8)
    from trimrt.plugins.kernels import token_recycle as kernels

    x = rng.standard_normal((2, 10, 4)).astype(np.float32)
    out = (torch.empty((2, 8, 4), device=device), torch.empty((2, 8), dtype=torch.int64, device=device))
    t = [to_torch(a, device) for a in (x, score, position)]
    kernels.run(*t, **OP.attribute_values(attrs), out=out)
    np.testing.assert_allclose(out[0].cpu().numpy(), OP.run_reference(x, score, position, **attrs)[0], rtol=1e-5)
    with pytest.raises(ValueError, match="output buffers"):
        kernels.run(*t, **OP.attribute_values(attrs), out=(out[0][:, :7], out[1]))


@pytest.mark.parametrize("attrs, match", [(dict(keep=3, grid=4), "grid"), (dict(keep=10, grid=2), "keep=10"),
                                          (dict(keep=1, protect=10, grid=1), "span")])
def test_kernel_rejects_what_the_reference_rejects(attrs, match, device):
    x, s, p = np.zeros((1, 10, 2), np.float32), np.zeros((1, 10), np.float32), np.arange(10)[None]
    attrs = {"protect": 1, **attrs, "patch_rows": 3, "patch_cols": 3}
    with pytest.raises(ValueError, match=match):
        OP.run_reference(x, s, p, **attrs)
    with pytest.raises(ValueError, match=match):
        run_triton(OP, [x, s, p], device, **attrs)


@pytest.mark.slow
def test_kernel_compiles_to_ptx():
    """The kernel compiles for a real GPU target (sm_80 PTX, what TensorRT AOT embeds)."""
    check_compiles_to_ptx("""
        from trimrt.plugins.kernels import token_recycle
        for dt in ("fp32", "fp16"):
            k = token_recycle.compile_kernel({"x": dt, "score": dt, "y": dt}, n=197, d=768, cells=9,
                                             target=GPUTarget("cuda", 80, 32))
            assert ".entry token_recycle_kernel" in k.asm["ptx"] and not getattr(k.metadata, "global_scratch_size", 0)
        print("ok")
    """)


# ------------------------------------------------------- TensorRT hooks (fake tensorrt)


def test_generated_plugin_signatures_follow_the_schema():
    trt, trtp = fake_tensorrt()
    spec = glue.spec_for(OP)
    names = [t.name for t in OP.inputs] + [a.name for a in OP.attributes]
    describe = inspect.signature(glue._descriptor(spec, trt, trtp))
    assert list(describe.parameters) == names
    annotations = [p.annotation for p in describe.parameters.values()]
    assert annotations == [trtp.TensorDesc] * 3 + [a.kind for a in OP.attributes]
    assert typing.get_args(describe.return_annotation) == (trtp.TensorDesc,) * 2
    assert list(inspect.signature(glue._jit_impl(spec, trtp)).parameters) == names + ["outputs", "stream"]
    assert list(inspect.signature(glue._aot_impl(spec, trtp)).parameters) == names + ["outputs", "tactic"]


@pytest.mark.parametrize("n, keep, protect, span_end, ratio, grid", [
    (17, 5, 1, 0, 1.0, 2), (197, 60, 1, 0, 1.0, 3), (197, 0, 1, 0, 0.3, 3), (40, 0, 2, 30, 0.5, 1),
    (30, 7, 3, 20, 1.0, 4)])
def test_symbolic_shapes_and_launch_args(n, keep, protect, span_end, ratio, grid):
    """Output shapes and AOT scalars from shape expressions (N known at run time only) ==
    the reference's shapes and the kernel's own launch arguments on ints."""
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import token_recycle as kernels

    ratio = float(np.float32(ratio))
    attrs = OP.attribute_values(dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio, grid=grid,
                                     patch_rows=14, patch_cols=14))
    trt, trtp = fake_tensorrt()
    b, d = 2, 3
    y, kept = OP.run_reference(np.zeros((b, n, d), np.float32), np.zeros((b, n), np.float32),
                               np.zeros((b, n), np.int64), **attrs)
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    x_sym = (Dim(b), Dim(n), Dim(d))
    got = describe(FakeDesc(x_sym), FakeDesc(x_sym[:2]), FakeDesc(x_sym[:2], "int64"), **attrs)
    assert [tuple(value(v) for v in shape) for shape, _ in got] == [y.shape, kept.shape]
    assert [dtype for _, dtype in got] == ["half", "int64"]
    args = kernels.scalar_args(x_sym, x_sym[:2], x_sym[:2], **attrs, sym=trtp)
    assert [value(v) for v in args] == kernels.scalar_args((b, n, d), (b, n), (b, n), **attrs)
    assert [value(v) for v in kernels.launch_grid(x_sym, cdiv=trtp.cdiv, block_d=2)] == [b, 2]


def test_describe_rejects_what_the_reference_rejects():
    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    x = (Dim(1), Dim(17), Dim(4))
    descs = (FakeDesc(x), FakeDesc(x[:2]), FakeDesc(x[:2], "int64"))
    with pytest.raises(ValueError, match="grid"):
        describe(*descs, keep=3, grid=5, patch_rows=4, patch_cols=4)
    with pytest.raises(ValueError, match="TokenRecycle: keep=6 must be in"):
        describe(*descs, keep=6, protect=1, span_end=6, grid=2, patch_rows=4, patch_cols=4)


# ---------------------------------------------------------------------- with TensorRT


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("keep, protect, span_end, keep_ratio, grid",
                         [(1, 1, 0, 1.0, 2), (60, 1, 0, 1.0, 3), (196, 1, 0, 1.0, 3), (0, 1, 0, 0.5, 2),
                          (20, 2, 150, 1.0, 3)])
def test_tensorrt_plugin(aot, keep, protect, span_end, keep_ratio, grid):
    pytest.importorskip("tensorrt")
    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(OP)
    rng = np.random.default_rng(keep)
    b, n, d = 2, 197, 40
    feeds = {"x": rng.standard_normal((b, n, d)).astype(np.float32),
             "score": (rng.integers(0, 8, size=(b, n)) / 8).astype(np.float32),
             "position": np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()}
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=keep_ratio, grid=grid, patch_rows=14,
                 patch_cols=14)
    expected = OP.run_reference(*feeds.values(), **{**attrs, "keep_ratio": float(np.float32(keep_ratio))})
    model = one_node_model(OP, feeds, [e.shape for e in expected], attrs, aot)
    tensors = run_tensorrt(model, feeds, strongly_typed=False)
    np.testing.assert_array_equal(tensors["kept_index"], expected[1])
    np.testing.assert_allclose(tensors["y"], expected[0], rtol=1e-5, atol=1e-5)
