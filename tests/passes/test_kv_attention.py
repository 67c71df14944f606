"""KVAttentionPass: each decoder layer's attention is one ONNX Attention on its cache (RMSNorm
and RoPE fused), never a repeated cache, with the exported graph's results."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import build  # noqa: E402
from trimrt.runtime.backends import OnnxRuntimeBackend  # noqa: E402

# family: (RMSNorms fused, RoPEs fused) of its 2 layers; GPT-2 has LayerNorms and learned positions
FUSED = {"llama": (5, 4), "qwen2": (5, 4), "mistral": (5, 4), "gpt2": (0, 0)}


@pytest.mark.parametrize("family", sorted(FUSED))
def test_attention_ops_equal_the_exported_attention(family):
    path, _ = build(family)
    session = trimrt.load(path)
    report = next(p["report"] for p in session.manifest["passes"] if p["pass"] == "kv_attention")
    rms, rope = FUSED[family]
    assert report["attention_ops"] == 2 and report["grouped"] == 0 and report["opset"] == 23
    assert report["rms_normalization"] == rms and report["rotary_embedding"] == rope and report["token_major"] == 2
    assert report["max_relative_error"] < 1e-4
    assert session.manifest["flops"]["ratio"] == pytest.approx(1.0, abs=1e-4)  # the Attention counts its products
    graph = ir.load(str(path / "model.onnx")).graph
    ops = [n.op_type for n in graph]
    assert ops.count("Attention") == 2 and "Softmax" not in ops
    # the attention runs on the projections as they come ([B, S, heads·d]): no head views around it
    assert all(len(n.inputs[0].shape) == 3 for n in graph if n.op_type in ("Attention", "RotaryEmbedding"))
    assert not [n for n in graph if n.op_type == "Transpose" and list(n.attributes.get_ints("perm", [])) == [0, 2, 1, 3]]
    # no Expand copies the cache (a 5-D Expand: [B, Hkv, G, T, d])
    assert not [n for n in graph if n.op_type == "Expand" and n.outputs[0].shape is not None
                and len(n.outputs[0].shape) == 5]
    reference = OnnxRuntimeBackend(str(path / session.manifest["reference"]))
    reference.activate()
    spec = session.generator().spec
    for feeds in (spec.random_feeds(2, new=3, past=9), spec.random_feeds(2, new=7, past=0)):
        want, got = reference.infer(feeds), session.run(feeds)
        assert set(got) == set(want)  # the present key / value keep their names
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
