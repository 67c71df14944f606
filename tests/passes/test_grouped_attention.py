"""GroupedAttentionPass: a GQA decoder's attention runs on grouped query heads, never on a
repeated cache, with the original graph's results."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import build  # noqa: E402
from trimrt.runtime.backends import OnnxRuntimeBackend  # noqa: E402


@pytest.mark.parametrize("family, rewritten", [("llama", 2), ("qwen2", 2), ("gpt2", 0)])
def test_grouped_attention_equals_the_repeated_heads(family, rewritten):
    path, _ = build(family)
    session = trimrt.load(path)
    report = next(p["report"] for p in session.manifest["passes"] if p["pass"] == "grouped_attention")
    assert report == {"attention_blocks": rewritten}  # GPT-2 has no grouped heads: nothing to do
    graph = ir.load(str(path / "model.onnx")).graph
    # no Expand copies the cache any more (a 5-D Expand: [B, Hkv, G, T, d])
    repeats = [n for n in graph if n.op_type == "Expand" and n.outputs[0].shape is not None and len(n.outputs[0].shape) == 5]
    assert not repeats
    reference = OnnxRuntimeBackend(str(path / session.manifest["reference"]))
    reference.activate()
    feeds = session.generator().spec.random_feeds(2, new=3, past=9)
    want, got = reference.infer(feeds), session.run(feeds)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
