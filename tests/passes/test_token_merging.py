"""TokenMergingPass (ToMe): the merged build equals ToMe written in plain PyTorch, on
every export form; shapes shrink by r per block; bad r is a recipe error."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from tests.passes.in_memory import apply_recipe, run_model
from tests.passes.tome_reference import tome_forward
from trimrt.errors import RecipeError
from trimrt.passes import PASS_TAG
from trimrt.recipe import load_recipe


def merge_in_memory(path, **options):
    return apply_recipe(path, "token_merging", **options)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_model(model, {"pixel_values": x})


@pytest.mark.parametrize("export", ["tiny_vit_onnx", "tiny_vit_sdpa_onnx", "tiny_vit_torchscript_onnx",
                                    "tiny_vit_opset23_onnx"])
@pytest.mark.parametrize("r, proportional", [([8, 8, 8, 8], True), ([0, 16, 5, 3], True), ([12, 12, 0, 0], False)])
def test_merged_build_matches_pytorch_tome(export, r, proportional, request, images):
    module, path = request.getfixturevalue(export)
    model, reports = merge_in_memory(path, r=r, proportional_attention=proportional)
    got = run(model, images)
    with torch.no_grad():
        want = tome_forward(module, torch.from_numpy(images), dict(enumerate(r)), proportional).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    report = reports["token_merging"]
    assert report["tokens_after"] == 65 - sum(r)
    assert [x["merged"] for x in report["layers"]] == [v for v in r if v]


def test_inserts_merge_ops_and_proportional_bias(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    model, _ = merge_in_memory(path, r=4, layers=[0, 2])
    ops = Counter((n.domain, n.op_type) for n in model.graph)
    assert ops[("trimrt", "TokenMerge")] == 2
    inserted = [n for n in model.graph if n.metadata_props.get(PASS_TAG) == "token_merging"]
    # log(size) joins the logits of blocks 1, 2 (after merge 0) and 3 (after merge 2)
    assert sum(n.op_type == "Log" for n in inserted) == 2
    softmax_inputs = [n.inputs[0].producer() for n in model.graph if n.op_type == "Softmax"]
    assert sum(p is not None and p.metadata_props.get(PASS_TAG) == "token_merging" for p in softmax_inputs) == 3


def test_merging_shrinks_tensors_downstream(tiny_vit_onnx, images):
    _, path = tiny_vit_onnx
    model, _ = merge_in_memory(path, r=[10, 10, 10, 10])
    proto = ir.serde.serialize_model(model)
    names = [v.name for n in model.graph for v in n.outputs if n.op_type == "Softmax"]
    for out in names:
        proto.graph.output.add().name = out
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(names, {"pixel_values": images})
    assert [a.shape[-1] for a in got] == [65, 55, 45, 35]


def test_r_is_clamped_to_the_mergeable_tokens_like_tome(tiny_vit_onnx, images):
    """As ToMe does, a block merges at most its A tokens after the CLS: 65 tokens → 32, then 16."""
    module, path = tiny_vit_onnx
    model, reports = merge_in_memory(path, r=[40, 20])
    layers = reports["token_merging"]["layers"]
    assert [(x["merged"], x.get("clamped_from")) for x in layers] == [(32, 40), (16, 20)]
    with torch.no_grad():
        want = tome_forward(module, torch.from_numpy(images), {0: 32, 1: 16}).numpy()
    np.testing.assert_allclose(run(model, images), want, atol=2e-5, rtol=1e-4)


def test_layer_out_of_range_is_a_recipe_error(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    with pytest.raises(RecipeError, match="do not exist"):
        merge_in_memory(path, r=2, layers=[7])


def test_recipe_validation():
    with pytest.raises(RecipeError, match="not both"):
        load_recipe({"token_merging": {"r": 8, "ratio": 0.1}})
    with pytest.raises(RecipeError, match="ratio must be a number in"):
        load_recipe({"token_merging": {"ratio": 0.5}})
    assert load_recipe({"token_merging": {"r": 8}}).token_merging.schedule(3) == [(0, 8), (1, 8), (2, 8)]
    with pytest.raises(RecipeError, match="3 values for 2 layers"):
        load_recipe({"token_merging": {"r": [1, 2, 3], "layers": [0, 1]}})
    with pytest.raises(RecipeError, match="cannot be combined"):
        load_recipe({"token_merging": {"r": [1]}, "token_pruning": {"layers": [1], "keep": 0.5}})
    opts = load_recipe({"token_merging": {"r": 13, "layers": list(range(12))}}).token_merging
    assert opts.r == (13,) * 12 and opts.layers == tuple(range(12))


def test_masked_mean_pooling_is_weighted_by_size(tmp_path):
    """A sentence embedder (BERT + masked mean pooling): after merging, the pooled mean
    counts each token by its size, Σ m·s·h / Σ m·s, with the final hidden states and
    sizes read from the build itself."""
    pytest.importorskip("transformers")
    import onnx
    import transformers as tf

    import trimrt
    from examples.models.minilm import _sentence_embedder_class

    torch.manual_seed(0)
    config = tf.BertConfig(hidden_size=64, vocab_size=200, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=128)
    config._attn_implementation = "eager"  # an explicit softmax(QKᵀ + mask), as the MiniLM example exports
    bert = tf.BertModel(config)
    module = _sentence_embedder_class()(bert.eval()).eval()
    ids = torch.randint(0, 200, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    path = tmp_path / "embedder.onnx"
    trimrt.export(module, path, example_inputs={"input_ids": ids, "attention_mask": mask})
    model, reports = merge_in_memory(path, r=[6, 6, 6])
    assert len(reports["token_merging"]["weighted_pooling"]) == 1
    proto = ir.serde.serialize_model(model)
    merges = [n for n in proto.graph.node if n.op_type == "TokenMerge"]
    pooled_mul = next(n for n in proto.graph.node if n.op_type == "Mul" and n.name.endswith("_weighted"))
    weighted_users = [n for n in proto.graph.node if pooled_mul.output[0] in n.input and n.op_type == "Mul"]
    hidden = next(i for i in weighted_users[0].input if i != pooled_mul.output[0])
    extra = [merges[-1].output[1], hidden]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in extra)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    emb, size, h = session.run(None, feeds)
    assert size.shape == (2, 40 - 18) and np.allclose(size.sum(axis=1), 40)
    pooled = (h * size[..., None]).sum(axis=1) / size.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(emb, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-5)

    # a ratio serves every length of a dynamic-length export: 40 and 9 tokens
    by_ratio, reports = merge_in_memory(path, ratio=0.2)
    assert reports["token_merging"]["layers"][0]["merged"] == "min(floor(0.2·tokens), mergeable)"
    for n in (40, 9):
        short = {k: v[:, :n] for k, v in feeds.items()}
        out = run_model(by_ratio, short)
        assert out.shape == (2, 64) and np.all(np.isfinite(out))

    unweighted, reports = merge_in_memory(path, r=[6, 6, 6], weighted_pooling=False)
    assert reports["token_merging"]["weighted_pooling"] == []
    assert not np.allclose(run_model(unweighted, feeds), emb, atol=1e-4)


def test_ratio_merges_a_share_of_each_blocks_tokens(tiny_vit_onnx, images):
    """ratio 0.2 on 65 tokens: floor(0.2·65) = 13, then floor(0.2·52) = 10, 8, 6."""
    module, path = tiny_vit_onnx
    model, reports = merge_in_memory(path, ratio=0.2)
    assert [x["merged"] for x in reports["token_merging"]["layers"]] == [13, 10, 8, 6]
    with torch.no_grad():
        want = tome_forward(module, torch.from_numpy(images), {0: 13, 1: 10, 2: 8, 3: 6}).numpy()
    np.testing.assert_allclose(run(model, images), want, atol=2e-5, rtol=1e-4)
