"""TokenSlim: decomposition on ORT == NumPy reference == Triton kernel (interpreter),
the reference == the PyTorch TSM, and the TensorRT hooks (fake tensorrt; gpu-marked)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.plugins.op_testing import (
    Dim,
    FakeDesc,
    fake_tensorrt,
    one_node_model,
    run_decomposition,
    run_tensorrt,
    run_triton,
)
from trimrt.errors import BackendUnavailableError
from trimrt.plugins import REGISTRY
from trimrt.plugins import tensorrt_glue as glue

OP = REGISTRY["TokenSlim"]


def _inputs(rng, b, n, d, hd, m, spread=0.5):
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    return [
        x,
        (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32),
        (0.1 * rng.standard_normal(d)).astype(np.float32),
        (spread * rng.standard_normal((d, hd))).astype(np.float32),
        (0.1 * rng.standard_normal(hd)).astype(np.float32),
        (spread * rng.standard_normal((hd, m))).astype(np.float32),
        (0.1 * rng.standard_normal(m)).astype(np.float32),
    ]


SIZES = [  # b, n, d, hd, m
    (1, 16, 64, 32, 8),  # powers of two (the SiT test model's first TSM)
    (3, 17, 13, 7, 5),  # batch > 1, odd sizes
    (2, 70, 40, 16, 35),  # N > one token chunk of the kernel, D < one feature block
    (2, 9, 72, 8, 9),  # M = N (no reduction), D > one feature block
    (1, 1, 4, 3, 1),  # a single token: y = x
    (2, 12, 6, 4, 1),  # a single output token
]


# ----------------------------------------------------------------------- reference


def test_reference_matches_the_pytorch_module(rng):
    torch = pytest.importorskip("torch")
    from examples.models.sit import TokenSlimming

    torch.manual_seed(0)
    module = TokenSlimming(24, 12, 6, scale=0.7).eval()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = rng.standard_normal((2, 10, 24)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    lin1, lin2 = module.mlp[0], module.mlp[2]
    weights = [t.detach().numpy() for t in (module.norm.weight, module.norm.bias, lin1.weight.T, lin1.bias,
                                            lin2.weight.T, lin2.bias)]
    (got,) = OP.run_reference(x, *weights, epsilon=module.norm.eps, scale=0.7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_outputs_are_convex_combinations(rng):
    ins = _inputs(rng, 2, 11, 5, 4, 3, spread=2.0)
    (y,) = OP.run_reference(*ins, scale=3.0)
    assert y.shape == (2, 3, 5) and y.dtype == np.float32
    x = ins[0]
    assert np.all(y <= x.max(axis=1, keepdims=True) + 1e-6) and np.all(y >= x.min(axis=1, keepdims=True) - 1e-6)
    (single,) = OP.run_reference(x[:, :1], *ins[1:])  # one token: every output token is it
    np.testing.assert_allclose(single, np.repeat(x[:, :1], 3, axis=1), rtol=1e-6)
    # scale 0: uniform weights, every output token is the mean token
    (mean,) = OP.run_reference(*ins, scale=0.0)
    np.testing.assert_allclose(mean, np.repeat(x.mean(axis=1, keepdims=True), 3, axis=1), rtol=1e-5, atol=1e-6)


def test_reference_rejects_mismatched_weights(rng):
    ins = _inputs(rng, 1, 4, 6, 3, 2)
    with pytest.raises(ValueError, match="do not chain"):
        OP.run_reference(ins[0], ins[1], ins[2], ins[5], ins[4], ins[3], ins[6])


# ------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("b, n, d, hd, m", SIZES)
@pytest.mark.parametrize("epsilon, scale", [(1e-5, 1.0), (1e-6, 0.25), (0.1, 4.0)])
def test_decomposition_matches_reference(b, n, d, hd, m, epsilon, scale, rng):
    ins = _inputs(rng, b, n, d, hd, m)
    (want,) = OP.run_reference(*ins, epsilon=epsilon, scale=scale)
    (got,) = run_decomposition("TokenSlim", ins, epsilon=epsilon, scale=scale)
    assert got.shape == (b, m, d)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_decomposition_defaults(rng):
    ins = _inputs(rng, 2, 8, 6, 5, 3)
    (want,) = OP.run_reference(*ins)  # epsilon 1e-5, scale 1.0
    (got,) = run_decomposition("TokenSlim", ins)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_function_uses_opset_18_ops_only():
    fn = OP.function()
    assert {(o.domain, o.version) for o in fn.opset_import} == {("", 18)}
    ops = {n.op_type for n in fn.node}
    assert "Gelu" not in ops and "Erf" in ops and "LayerNormalization" in ops
    assert {a.name for a in fn.attribute_proto} == {"epsilon", "scale"}


# ---------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("b, n, d, hd, m", SIZES)
def test_kernel_matches_reference(b, n, d, hd, m, rng, device):
    ins = _inputs(rng, b, n, d, hd, m, spread=1.0)
    (want,) = OP.run_reference(*ins, epsilon=1e-6, scale=0.8)
    (got,) = run_triton(OP, ins, device, epsilon=1e-6, scale=0.8)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_large_logits_stay_finite(rng, device):
    """Logits in the hundreds: the online softmax must subtract its running max."""
    ins = _inputs(rng, 2, 40, 8, 6, 4, spread=3.0)
    (want,) = OP.run_reference(*ins, scale=50.0)
    (got,) = run_triton(OP, ins, device, scale=50.0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_kernel_writes_into_given_buffer_and_checks_shapes(rng, device):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import token_slim as kernels

    ins = _inputs(rng, 2, 6, 5, 4, 3)
    tensors = [torch.from_numpy(a).to(device) for a in ins]
    out = torch.full((2, 3, 5), float("nan"), device=device)
    (y,) = kernels.run(*tensors, **OP.attribute_values({}), out=(out,))
    assert y is out
    np.testing.assert_allclose(out.cpu().numpy(), OP.run_reference(*ins)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="b2"):
        kernels.run(*tensors[:6], tensors[6][:2], **OP.attribute_values({}))
    with pytest.raises(ValueError, match="output buffer"):
        kernels.run(*tensors, **OP.attribute_values({}), out=(torch.empty((2, 4, 5), device=device),))


# ---------------------------------------------------------------- TensorRT (fake)


def test_describe_gives_output_shape_and_dtype():
    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    x = FakeDesc(("B", "N", "D"), "half")
    descs = [x] + [FakeDesc(shape, "float") for shape in [("D",), ("D",), ("D", 32), (32,), (32, 8), (8,)]]
    assert describe(*descs, epsilon=1e-6, scale=0.5) == ((("B", 8, "D"), "half"),)
    assert describe(*descs) == ((("B", 8, "D"), "half"),)  # attribute defaults


def test_launch_args_on_shape_expressions_match_ints():
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import token_slim as kernels

    _, trtp = fake_tensorrt()
    x, w2 = (2, 70, 40), (16, 35)
    sym_x, sym_w2 = tuple(Dim(v) for v in x), tuple(Dim(v) for v in w2)
    assert [v.value for v in kernels.scalar_args(sym_x, sym_w2)] == kernels.scalar_args(x, w2) == [70, 35, 40]
    sym_grid = kernels.grid(sym_x, sym_w2, cdiv=trtp.cdiv, block_d=16)
    assert [v.value for v in sym_grid] == list(kernels.grid(x, w2, block_d=16)) == [2, 35, 3]


def test_signatures_follow_the_schema():
    import inspect

    trt, trtp = fake_tensorrt()
    spec = glue.spec_for(OP)
    names = ["x", "ln_scale", "ln_bias", "w1", "b1", "w2", "b2", "epsilon", "scale"]
    assert list(inspect.signature(glue._descriptor(spec, trt, trtp)).parameters) == names
    assert list(inspect.signature(glue._jit_impl(spec, trtp)).parameters) == names + ["outputs", "stream"]
    assert list(inspect.signature(glue._aot_impl(spec, trtp)).parameters) == names + ["outputs", "tactic"]


def test_aot_is_unavailable_with_a_clear_error():
    pytest.importorskip("triton")
    spec = glue.spec_for(OP)
    with pytest.raises(BackendUnavailableError, match="JIT") as info:
        spec.aot(fake_tensorrt()[1], {}, {"epsilon": 1e-5, "scale": 1.0}, [])
    assert "\n" not in str(info.value)


@pytest.mark.gpu
def test_token_slim_plugin_jit(rng):
    """One TokenSlim node through TensorRT (JIT impl) == the reference."""
    pytest.importorskip("tensorrt")
    glue.register(OP)
    ins = _inputs(rng, 2, 33, 40, 16, 9)
    attrs = {"epsilon": 1e-6, "scale": 0.5}
    (want,) = OP.run_reference(*ins, **attrs)
    feeds = dict(zip([t.name for t in OP.inputs], ins))
    got = run_tensorrt(one_node_model(OP, feeds, [want.shape], attrs, aot=False), feeds)
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5)
