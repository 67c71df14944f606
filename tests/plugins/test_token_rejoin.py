"""TokenRejoin: the routed rows written back among the skipped ones — the reference by hand,
decomposition on ORT == reference == Triton kernel (interpreter), float16, and the
TensorRT hooks (fake tensorrt; the PTX compile is slow-marked, the plugin gpu-marked)."""

from __future__ import annotations

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
)
from trimrt.plugins import REGISTRY
from trimrt.plugins import tensorrt_glue as glue

OP = REGISTRY["TokenRejoin"]


def _inputs(rng, b, n, m, d, dtype=np.float32, shuffled=True):
    rows = [rng.permutation(n)[:m] for _ in range(b)]
    index = np.stack([r if shuffled else np.sort(r) for r in rows]).astype(np.int64).reshape(b, m)
    return [rng.standard_normal((b, n, d)).astype(dtype), rng.standard_normal((b, m, d)).astype(dtype), index]


SIZES = [(1, 5, 2, 3), (3, 70, 33, 40), (2, 9, 9, 72), (2, 130, 1, 5), (1, 4, 0, 3)]  # b, n, m, d


def test_reference_by_hand():
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    y = -np.ones((1, 2, 3), np.float32)
    y[0, 1] *= 2
    (out,) = OP.run_reference(x, y, np.array([[3, 1]]))
    assert out[0].tolist() == [[0, 1, 2], [-2, -2, -2], [6, 7, 8], [-1, -1, -1]]
    assert x[0, 3].tolist() == [9, 10, 11]  # the input is not written


@pytest.mark.parametrize("index, message", [(np.array([[1, 1]]), "appears twice"),
                                            (np.array([[0, 4]]), "outside the 4 tokens"),
                                            (np.array([[0]]), r"need x \[B, N, D\], y \[B, M, D\] and index \[B, M\]")])
def test_reference_refuses_bad_indices(index, message):
    with pytest.raises(ValueError, match=message):
        OP.run_reference(np.zeros((1, 4, 3), np.float32), np.zeros((1, 2, 3), np.float32), index)


@pytest.mark.parametrize("b, n, m, d", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decomposition_matches_reference(b, n, m, d, dtype, rng):
    ins = _inputs(rng, b, n, m, d, dtype)
    (got,) = run_decomposition("TokenRejoin", ins)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, OP.run_reference(*ins)[0])


@pytest.mark.parametrize("b, n, m, d", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kernel_matches_reference(b, n, m, d, dtype, rng, device):
    ins = _inputs(rng, b, n, m, d, dtype)
    (got,) = run_triton(OP, ins, device)
    assert got.shape == (b, n, d) and got.dtype == dtype
    np.testing.assert_array_equal(got, OP.run_reference(*ins)[0])


def test_kernel_writes_into_given_buffer_and_checks_shapes(rng, device):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import token_rejoin as kernels

    ins = _inputs(rng, 2, 7, 3, 4)
    x, y, index = (torch.from_numpy(a).to(device) for a in ins)
    out = torch.full((2, 7, 4), float("nan"), device=device)
    (got,) = kernels.run(x, y, index, out=(out,))
    assert got is out
    np.testing.assert_array_equal(out.cpu().numpy(), OP.run_reference(*ins)[0])
    with pytest.raises(ValueError, match="index"):
        kernels.run(x, y, index[:, :2])
    with pytest.raises(ValueError, match="output buffer"):
        kernels.run(x, y, index, out=(torch.empty((2, 3, 4), device=device),))


# ---------------------------------------------------------------- TensorRT (fake)


def test_describe_gives_the_shape_of_x():
    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    descs = [FakeDesc(("B", "N", "D"), "half"), FakeDesc(("B", "M", "D"), "half"), FakeDesc(("B", "M"), "int64")]
    assert describe(*descs) == ((("B", "N", "D"), "half"),)


def test_launch_args_on_shape_expressions_match_ints():
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import token_rejoin as kernels

    _, trtp = fake_tensorrt()
    shapes = [(3, 70, 40), (3, 33, 40), (3, 33)]
    sym = [tuple(Dim(v) for v in s) for s in shapes]
    assert [v.value for v in kernels.scalar_args(*sym)] == kernels.scalar_args(*shapes) == [70, 33, 40]
    assert [v.value for v in kernels.grid(*sym, cdiv=trtp.cdiv, block_d=16)] == list(
        kernels.grid(*shapes, block_d=16)) == [3, 3]


@pytest.mark.slow
def test_kernel_compiles_to_ptx():
    """The kernel compiles for a real GPU target (sm_80 PTX, what the TensorRT AOT path embeds)."""
    check_compiles_to_ptx("""
        from trimrt.plugins.kernels import token_rejoin as kernels
        target = GPUTarget("cuda", 80, 32)
        for dt in ("fp32", "fp16"):
            k = kernels.compile_kernel({"x": dt, "y": dt, "out": dt}, n=577, d=4096, target=target)
            assert ".entry token_rejoin_kernel" in k.asm["ptx"], k.metadata.name
            assert getattr(k.metadata, "global_scratch_size", 0) == 0
        print("ok")
    """, timeout=600)


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
def test_token_rejoin_plugin(aot, rng):
    """One TokenRejoin node through TensorRT (the registered plugin) == the reference."""
    pytest.importorskip("tensorrt")
    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(OP)
    x, y, index = _inputs(rng, 3, 69, 20, 40)
    want = OP.run_reference(x, y, index)
    model = one_node_model(OP, {"x": x, "y": y, "index": index}, [w.shape for w in want], {}, aot)
    got = run_tensorrt(model, {"x": x, "y": y, "index": index})
    np.testing.assert_array_equal(got["out"], want[0])
