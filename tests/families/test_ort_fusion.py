"""[onnxruntime] fuse: attention, GELU and skip-LayerNorm become ONNX Runtime contrib ops,
the outputs stay those of the unfused graph, and a fusion that would change them is
refused (the graph is left as it was)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

import trimrt  # noqa: E402
from tests.families.hf_models import exported, run_onnx  # noqa: E402
from trimrt.errors import BuildError  # noqa: E402
from trimrt.passes import ort_fusion  # noqa: E402

FUSE = {"onnxruntime": {"fuse": True}}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path, _, _, feeds = exported("bert")
    return path, feeds




def _ops(path) -> Counter:
    return Counter((n.domain, n.op_type) for n in onnx.load(str(path)).graph.node)


def _report(manifest, name="ort_fusion"):
    return next(p["report"] for p in manifest["passes"] if p["pass"] == name)


def test_fused_bert_keeps_its_outputs(bert, tmp_path):
    path, feeds = bert
    manifest = trimrt.compile(str(path), FUSE, tmp_path / "b")
    report = _report(manifest)
    assert report["applied"] and report["fused"]["mha_no_past"] == 3 and "skip_layer_norm" not in report["fused"]
    # ORT's SkipLayerNormalization CPU kernel is slower than Add + LayerNormalization: the
    # build asks the session not to fuse them, and trimrt's runtime does so
    assert manifest["onnxruntime"] == {"disabled_optimizers": ["SkipLayerNormFusion"]}
    assert trimrt.load(tmp_path / "b").backend.disabled_optimizers == ["SkipLayerNormFusion"]
    ops = _ops(tmp_path / "b" / "model.onnx")
    assert ops[("com.microsoft", "MultiHeadAttention")] == 3 and ops[("", "Softmax")] == 0
    assert ops[("com.microsoft", "BiasGelu")] == 3 and ops[("", "Erf")] == 0
    assert manifest["flops"]["ratio"] == pytest.approx(1.0, abs=1e-4)  # MultiHeadAttention counts its products
    want, got = run_onnx(path, feeds), run_onnx(tmp_path / "b" / "model.onnx", feeds)  # the padded sample included
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_fusion_composes_with_int8_and_keeps_the_projections_quantized(bert, tmp_path):
    path, feeds = bert
    trimrt.compile(str(path), {"quantization": {}}, tmp_path / "q")
    manifest = trimrt.compile(str(path), {"quantization": {}, **FUSE}, tmp_path / "qf")
    assert _report(manifest)["applied"]
    ops = _ops(tmp_path / "qf" / "model.onnx")
    assert ops[("com.microsoft", "MultiHeadAttention")] == 3
    assert ops[("", "MatMulInteger")] == _report(manifest, "quantization")["matmuls_quantized"] == 3 * 6 + 1  # q, k, v, out, 2 MLP per block; the pooler (a Gemm)
    want, got = run_onnx(tmp_path / "q" / "model.onnx", feeds), run_onnx(tmp_path / "qf" / "model.onnx", feeds)
    for name in want:  # the same int8 numerics, float ops merely fused
        assert np.linalg.norm(got[name] - want[name]) <= 1e-3 * np.linalg.norm(want[name])


def test_a_fusion_that_changes_the_outputs_is_not_applied(bert, tmp_path, monkeypatch):
    path, feeds = bert
    real = ort_fusion.fuse_for_onnxruntime

    def wrong(model, **kwargs):  # fuse, then break one weight: what a faulty rule would do
        counts = real(model, **kwargs)
        init = next(v for v in model.graph.initializers.values() if v.const_value is not None
                    and v.const_value.numpy().dtype == np.float32 and v.const_value.numpy().size > 100)
        import onnx_ir as ir

        init.const_value = ir.tensor(init.const_value.numpy() * 2.0, name=init.name)
        return counts

    monkeypatch.setattr(ort_fusion, "fuse_for_onnxruntime", wrong)
    manifest = trimrt.compile(str(path), FUSE, tmp_path / "b")
    report = _report(manifest)
    assert not report["applied"] and "differs from the unfused one" in report["reason"]
    assert _ops(tmp_path / "b" / "model.onnx")[("com.microsoft", "MultiHeadAttention")] == 0
    want, got = run_onnx(path, feeds), run_onnx(tmp_path / "b" / "model.onnx", feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_fusion_is_for_onnxruntime_builds_only(bert, tmp_path):
    path, _ = bert
    with pytest.raises(BuildError, match=r"\[onnxruntime\].*ONNX Runtime builds"):
        trimrt.compile(str(path), FUSE, tmp_path / "t", target="tensorrt")


def test_attention_fuses_in_pruned_blocks_too(bert, tmp_path):
    """After a pruning step the token count is a run-time value (shape inference loses the
    head count) and the score op reads the attention's q / kᵀ: every block still fuses,
    and the fused build equals the unfused pruned one."""
    path, feeds = bert
    pruning = {"token_pruning": {"layers": [1], "keep": 0.5}}
    trimrt.compile(str(path), pruning, tmp_path / "p")
    manifest = trimrt.compile(str(path), {**pruning, **FUSE}, tmp_path / "pf")
    assert _report(manifest)["fused"]["mha_no_past"] == 3
    assert _ops(tmp_path / "pf" / "model.onnx")[("com.microsoft", "MultiHeadAttention")] == 3
    want, got = run_onnx(tmp_path / "p" / "model.onnx", feeds), run_onnx(tmp_path / "pf" / "model.onnx", feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_tome_blocks_fuse_and_keep_their_outputs(bert, tmp_path):
    """ToMe's key mean reads the attention's keys (a private copy lets the block fuse);
    proportional attention's log(size) bias must survive the fusion."""
    path, feeds = bert
    merging = {"token_merging": {"r": 4}}
    trimrt.compile(str(path), merging, tmp_path / "m")
    manifest = trimrt.compile(str(path), {**merging, **FUSE}, tmp_path / "mf")
    report = _report(manifest)
    assert report["applied"] and report["fused"]["mha_no_past"] >= 1
    want, got = run_onnx(tmp_path / "m" / "model.onnx", feeds), run_onnx(tmp_path / "mf" / "model.onnx", feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
