"""QuantizationPass (first slice: INT8 weights per output channel, dynamic INT8
activations): the quantized weights follow the formula, a one-MatMul build equals the
NumPy reference of the numerics, and it composes with token pruning."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import trimrt
from trimrt.quantization.numerics import quantize_int8_per_channel as quantize_weight
from trimrt.runtime.backends import exact_u8s8


def test_weights_are_rounded_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 20)).astype(np.float32) * rng.uniform(0.01, 3, size=20).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column stays exactly zero
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and scale.shape == (20,)
    np.testing.assert_allclose(scale[np.arange(20) != 3], np.abs(w).max(0)[np.arange(20) != 3] / 127, rtol=1e-6)
    assert np.abs(q).max() == 127 and np.all(q[:, 3] == 0)
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)  # round to nearest


def _dynamic_quantize(x: np.ndarray):
    """ONNX DynamicQuantizeLinear: uint8, the range widened to include 0."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    return np.clip(np.rint(x / scale) + zp, 0, 255), scale, zp


def test_one_matmul_equals_the_numpy_reference(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 32])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 24])],
                          [onnx.numpy_helper.from_array(w, "w")])
    path = tmp_path / "mm.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]), str(path))
    manifest = trimrt.compile(str(path), {"quantization": {}}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")
    assert report["matmuls_quantized"] == 1
    assert report["weight_bytes_before"] == w.nbytes and report["weight_bytes_after"] == 32 * 24 + 24 * 4 + 24
    x = rng.standard_normal((5, 32)).astype(np.float32)
    got = trimrt.load(tmp_path / "b").run({"x": x})["y"]
    xq, x_scale, x_zp = _dynamic_quantize(x)
    wq, w_scale = quantize_weight(w)
    want = ((xq - x_zp) @ wq.astype(np.float64)) * (x_scale * w_scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_vit_int8_build(tmp_path, tiny_vit_onnx, images):
    _, path = tiny_vit_onnx
    manifest = trimrt.compile(str(path), {"quantization": {}, "token_pruning": {"layers": [1], "keep": 0.5}},
                              tmp_path / "b")
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    weights = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert ops["MatMulInteger"] == 17 and ops["TokenPrune"] == 1  # 4 blocks × (qkv, proj, fc1, fc2) + the head (a Gemm)
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")
    assert report["weight_bytes_after"] < report["weight_bytes_before"] / 3.5
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": images})[0]
    pruned = trimrt.compile(str(path), {"token_pruning": {"layers": [1], "keep": 0.5}}, tmp_path / "p")
    session = trimrt.load(tmp_path / "b")
    got = session.run({"pixel_values": images})["logits"]
    # on a VNNI CPU the session runs the 17 weights as int8 (ORT's U8S8 kernels: the same products)
    assert session.backend.signed_int8_weights == (17 if exact_u8s8() else 0)
    stored = trimrt.load(tmp_path / "b")
    stored.backend.signed_int8 = False
    stored.backend.activate()
    np.testing.assert_array_equal(stored.run({"pixel_values": images})["logits"], got)
    fp32 = trimrt.load(tmp_path / "p").run({"pixel_values": images})["logits"]
    cos = np.sum(got * fp32, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() > 0.999  # INT8 on top of the same pruning
    assert ref.shape == got.shape and pruned["flops"]["ratio"] == pytest.approx(manifest["flops"]["ratio"], rel=1e-3)


def test_attention_products_are_put_on_the_int8_grid():
    """quantize_products: both inputs of softmax(q·kᵀ·c)·v rounded to int8 with their own
    scale (zero point 0, saturating), v and the probabilities left float."""
    import onnx_ir as ir

    from trimrt.passes.base import GraphBuilder
    from trimrt.passes.quantization import quantize_products

    rng = np.random.default_rng(3)
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 3, 5, 4), (2, 3, 4, 5), (2, 3, 5, 4)])
    info = [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, a.shape) for n, a in [("q", q), ("kt", kt), ("v", v)]]
    graph = oh.make_graph([oh.make_node("MatMul", ["q", "kt"], ["s"]), oh.make_node("Mul", ["s", "c"], ["sc"]),
                           oh.make_node("Softmax", ["sc"], ["p"], axis=-1), oh.make_node("MatMul", ["p", "v"], ["y"])],
                          "attn", info, [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "c")])
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)]))
    scales = {"q": float(np.abs(q).max()) / 127, "kt": 0.01}  # kt's scale saturates its larger entries
    assert quantize_products(model.graph, scales, lambda g, prefix: GraphBuilder(g, prefix)) == 1
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"q": q, "kt": kt, "v": v})[0]

    def grid(x, s):
        return np.clip(np.rint(x / np.float32(s)), -128, 127) * np.float32(s)

    logits = grid(q, scales["q"]) @ grid(kt, scales["kt"]) * 0.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-5)


def test_the_openvino_target_quantizes_attention_products(tiny_vit_onnx, tmp_path):
    """On OpenVINO (as NNCF's transformer preset) the q·kᵀ inputs are int8 by default, with
    calibrated scales; `attention = false` keeps them float; ONNX Runtime builds refuse it."""
    import onnx_ir as ir

    from trimrt.compiler.analysis import score_products
    from trimrt.errors import RecipeError
    from trimrt.passes.quantization import QuantizationPass, product_sources
    from trimrt.recipe import load_recipe

    _, path = tiny_vit_onnx
    for attention, want in [(None, 4), (False, 0)]:
        table = {"weights": "int8"} if attention is None else {"weights": "int8", "attention": attention}
        recipe = load_recipe({"quantization": table, "calibration": {"random": True, "samples": 4}})
        model = ir.load(path)
        with pytest.warns(UserWarning, match="random data"):
            QuantizationPass(recipe.quantization, recipe.calibration, target="openvino", progress=False)(model)
        assert len(score_products(model.graph)) == 4
        # the int8 grid before the head split's Reshape / Transpose, which then move int8 data
        sources = [value.producer().op_type for value, *_ in product_sources(model.graph)]
        assert sources.count("DequantizeLinear") == 2 * want and len(sources) == 8
    recipe = load_recipe({"quantization": {"attention": True}})
    with pytest.raises(RecipeError, match="attention = true needs static activation scales, which onnxruntime builds"):
        QuantizationPass(recipe.quantization, target="onnxruntime")
    with pytest.raises(RecipeError, match="attention = true quantizes the q·kᵀ products to int8 and goes with int8"):
        load_recipe({"quantization": {"attention": True, "weights": "int4"}})


def test_smoothquant_after_pruning_a_post_norm_bert(small_vocab_bert, tmp_path):
    """A post-LN block's LayerNorm also feeds the residual, so SmoothQuant's 1/s stays a Mul
    (not folded); after pruning its input carries no type in the graph: the Mul gets float32."""
    rng = np.random.default_rng(0)
    (tmp_path / "calib").mkdir()
    for i in range(6):
        ids = rng.integers(0, 60, (1, 12))
        np.savez(tmp_path / "calib" / f"{i}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    recipe = {"token_pruning": {"layers": [0], "keep": 0.5}, "quantization": {"method": "smoothquant"},
              "calibration": {"source": str(tmp_path / "calib")}}
    manifest = trimrt.compile(str(small_vocab_bert), recipe, tmp_path / "b")
    assert manifest.pass_report("quantization")["matmuls_quantized"] > 0
    ids = np.array([[1, 5, 7, 9, 11, 13, 2, 4, 8, 3]], np.int64)
    out = trimrt.load(tmp_path / "b").run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert all(np.isfinite(v).all() for v in out.values())
