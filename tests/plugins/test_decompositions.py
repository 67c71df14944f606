"""Every op's ONNX-function decomposition, run on ONNX Runtime, equals its NumPy reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins.base import FUNCTION_OPSET

_DTYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.int64): onnx.TensorProto.INT64}


def run_decomposition(op_name: str, inputs: list[np.ndarray], **attrs) -> list[np.ndarray]:
    op = REGISTRY[op_name]
    in_names = [i.name for i in op.inputs]
    out_specs = op.outputs
    node = oh.make_node(op.name, in_names, [o.name for o in out_specs], domain=DOMAIN, **attrs)
    graph = oh.make_graph(
        [node], "one_op",
        [oh.make_tensor_value_info(n, _DTYPES[a.dtype], list(a.shape)) for n, a in zip(in_names, inputs)],
        [oh.make_tensor_value_info(o.name, onnx.TensorProto.INT64 if o.dtype == "int64" else onnx.TensorProto.FLOAT, None)
         for o in out_specs],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", FUNCTION_OPSET), oh.make_opsetid(DOMAIN, 1)],
                          functions=[op.function()])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(in_names, inputs)))


@pytest.mark.parametrize("batch,heads,n,dh", [(1, 1, 5, 4), (3, 6, 17, 8), (2, 4, 65, 16)])
@pytest.mark.parametrize("row", [0, -1, 2])
def test_attention_row_score_matches_reference(batch, heads, n, dh, row):
    rng = np.random.default_rng(n + row)
    q = rng.standard_normal((batch, heads, n, dh)).astype(np.float32)
    k_t = rng.standard_normal((batch, heads, dh, n)).astype(np.float32)
    (got,) = run_decomposition("AttentionRowScore", [q, k_t], row=row, scale=0.35)
    (want,) = REGISTRY["AttentionRowScore"].run_reference(q, k_t, row=row, scale=0.35)
    assert got.shape == (batch, n)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # head-mean of probability rows


def test_attention_row_score_reference_is_softmax_row():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 4, 3))
    k_t = rng.standard_normal((1, 2, 3, 4))
    logits = q @ k_t * 0.5
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    (got,) = REGISTRY["AttentionRowScore"].run_reference(q, k_t, row=0, scale=0.5)
    np.testing.assert_allclose(got[0], probs[0, :, 0, :].mean(axis=0))


CASES = [  # (batch, n, d, keep, protect)
    (1, 10, 4, 6, 1),
    (3, 17, 8, 1, 1),  # k = 1
    (2, 17, 8, 16, 1),  # k = all prunable tokens
    (2, 12, 5, 12, 0),  # k = all tokens, nothing protected
    (4, 33, 6, 9, 2),  # protect a prefix of 2
    (2, 65, 16, 45, 1),
]


@pytest.mark.parametrize("batch,n,d,keep,protect", CASES)
def test_token_prune_matches_reference(batch, n, d, keep, protect):
    rng = np.random.default_rng(n * keep)
    x = rng.standard_normal((batch, n, d)).astype(np.float32)
    score = rng.random((batch, n)).astype(np.float32)
    got = run_decomposition("TokenPrune", [x, score], keep=keep, protect=protect)
    want = REGISTRY["TokenPrune"].run_reference(x, score, keep=keep, protect=protect)
    assert got[0].shape == (batch, protect + keep, d)
    assert got[1].shape == (batch, protect + keep)
    assert got[2].shape == (batch, 1, d)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[2], want[2], atol=1e-5)


def test_token_prune_reference_semantics():
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1)
    score = np.array([[0.0, 0.1, 0.9, 0.2, 0.9, 0.05]], dtype=np.float32)
    y, kept, fused = REGISTRY["TokenPrune"].run_reference(x, score, keep=3, protect=1)
    # CLS kept; the top-3 of tokens 1..5 are 2, 4 (tie: both kept) and 3; order preserved
    assert kept.tolist() == [[0, 2, 3, 4]]
    assert y[0, :, 0].tolist() == [0.0, 2.0, 3.0, 4.0]
    # fused = Σ score_j x_j over dropped tokens 1 and 5
    np.testing.assert_allclose(fused[0, 0, 0], 0.1 * 1 + 0.05 * 5, rtol=1e-6)


def test_token_prune_ties_prefer_lower_index():
    x = np.random.default_rng(0).standard_normal((2, 8, 3)).astype(np.float32)
    score = np.full((2, 8), 0.5, dtype=np.float32)
    got = run_decomposition("TokenPrune", [x, score], keep=3, protect=1)
    assert got[1].tolist() == [[0, 1, 2, 3]] * 2


def test_token_prune_rejects_bad_keep():
    x = np.zeros((1, 4, 2), np.float32)
    with pytest.raises(ValueError, match="keep=4"):
        REGISTRY["TokenPrune"].run_reference(x, np.zeros((1, 4), np.float32), keep=4, protect=1)


def test_every_op_honours_the_contract():
    for name, op in REGISTRY.items():
        assert op.name == name and not name.startswith("TRT_")
        assert onnx.defs.has(name) is False, f"{name} collides with a standard ONNX op"
        fn = op.function()
        assert fn.domain == DOMAIN and fn.name == name
        assert [a for a in fn.attribute] == [a.name for a in op.attributes]
        assert op.triton and op.tensorrt
