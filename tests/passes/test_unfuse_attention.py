"""A model ONNX Runtime already optimised (each block's attention one
com.microsoft.MultiHeadAttention) takes the token-level passes: its fused attention is
written out as ops first (passes/unfuse_attention.py), exact up to rounding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from tests.passes.in_memory import apply_recipe, pixels, run_model
from trimrt.errors import StructureError


@pytest.fixture(scope="module")
def fused_vit(tiny_vit_onnx, tmp_path_factory):
    """The tiny ViT as ONNX Runtime's optimizer leaves it: MultiHeadAttention ops."""
    _, path = tiny_vit_onnx
    model, _ = apply_recipe(path, "onnxruntime", fuse=True)
    assert Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")["MultiHeadAttention"] == 4
    out = tmp_path_factory.mktemp("fused") / "vit_fused.onnx"
    ir.save(model, out)
    return out


def test_every_block_selected_reproduces_the_fused_model(fused_vit):
    x = pixels()
    want = run_model(ir.load(fused_vit), {"pixel_values": x})
    model, reports = apply_recipe(fused_vit, "sparse_attention", block_size=8, top_k=9)
    assert reports["unfuse_attention"]["unfused"] == 4
    assert Counter(n.op_type for n in model.graph if n.domain == "trimrt") == {"BlockSparseAttention": 4}
    np.testing.assert_allclose(run_model(model, {"pixel_values": x}), want, rtol=1e-5, atol=1e-5)


def test_token_pruning_on_the_fused_model_equals_it_on_the_export(tiny_vit_onnx, fused_vit):
    x = pixels()
    recipe = {"method": "cls_attention", "layers": [1], "keep": 0.5}
    want = run_model(apply_recipe(tiny_vit_onnx[1], "token_pruning", **recipe)[0], {"pixel_values": x})
    got = run_model(apply_recipe(fused_vit, "token_pruning", **recipe)[0], {"pixel_values": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_fused_attention_on_a_past_cache_is_refused(fused_vit, tmp_path):
    model = ir.load(fused_vit)
    node = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    past = ir.Value(name="past_key", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4, 3, 8]))
    model.graph.inputs.append(past)
    node.resize_inputs(7)
    node.replace_input_with(6, past)
    path = tmp_path / "with_past.onnx"
    ir.save(model, path)
    with pytest.raises(StructureError, match="MultiHeadAttention .* attends a past cache; token passes need"):
        apply_recipe(path, "sparse_attention", block_size=8, top_k=2)


def test_the_opset23_attention_on_3d_inputs_is_viewed_4d(fused_vit, tmp_path):
    """The opset-23 Attention on [B, S, heads·d] inputs (q_num_heads / kv_num_heads) becomes
    the same op on [B, heads, S, d] views, which analysis takes."""
    model = ir.load(fused_vit)
    model.opset_imports[""] = 23
    for node in [n for n in model.graph if n.op_type == "MultiHeadAttention"]:
        heads = node.attributes.get_int("num_heads")
        fused = ir.node("Attention", list(node.inputs[:3]), attributes={"q_num_heads": heads, "kv_num_heads": heads})
        model.graph.insert_before(node, fused)
        ir.convenience.replace_all_uses_with(node.outputs[0], fused.outputs[0])
        model.graph.remove(node, safe=True)
    _reproduced_with_every_block_selected(model, fused_vit, tmp_path / "vit_attention_3d.onnx")


def test_a_fused_bert_with_its_padding_mask(tmp_path):
    """BERT as ONNX Runtime fuses it (MultiHeadAttention with the padding mask as its bias):
    every block selected reproduces it, the padded sample included."""
    from tests.families.hf_models import exported

    path, _, _, feeds = exported("bert")
    fused, _ = apply_recipe(path, "onnxruntime", fuse=True)
    assert Counter(n.op_type for n in fused.graph if n.domain == "com.microsoft")["MultiHeadAttention"] == 3
    fused_path = tmp_path / "bert_fused.onnx"
    ir.save(fused, fused_path)
    want = run_model(ir.load(fused_path), feeds)
    sparse, reports = apply_recipe(fused_path, "sparse_attention", block_size=4, top_k=64)
    assert reports["unfuse_attention"]["unfused"] == 3
    np.testing.assert_allclose(run_model(sparse, feeds), want, rtol=1e-4, atol=1e-4)


def test_the_packed_ort_attention_is_written_out(fused_vit, tmp_path):
    """ONNX Runtime's Attention with the packed Q/K/V weights inside (its BERT optimizer's
    form), made here from the fused ViT (each MultiHeadAttention and the projection before
    it): written out, every block selected reproduces it."""
    model = ir.load(fused_vit)
    _pack(model)
    assert Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")["Attention"] == 4
    _reproduced_with_every_block_selected(model, fused_vit, tmp_path / "vit_packed.onnx")


@pytest.mark.parametrize("variant", ["key_padding_mask", "unidirectional", "scale"])
def test_the_written_out_attention_is_onnx_runtimes(fused_vit, variant):
    """The ops the pass writes compute what ONNX Runtime's MultiHeadAttention does with a
    [B, L] key padding mask, the causal rule (`unidirectional`) and a scale of its own."""
    from trimrt.passes import UnfuseAttentionPass
    from trimrt.passes.base import PipelineContext

    model = ir.load(fused_vit)
    feeds = {"pixel_values": pixels()}
    mask = ir.Value(name="key_mask", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([2, 65]))
    if variant == "key_padding_mask":
        model.graph.inputs.append(mask)
        feeds["key_mask"] = np.stack([np.ones(65), np.arange(65) < 50]).astype(np.int32)
    for node in [n for n in model.graph if n.op_type == "MultiHeadAttention"]:
        if variant == "key_padding_mask":
            node.resize_inputs(5)
            node.replace_input_with(4, mask)
        elif variant == "unidirectional":
            node.attributes["unidirectional"] = ir.AttrInt64("unidirectional", 1)
        else:
            node.attributes["scale"] = ir.AttrFloat32("scale", 0.3)
    want = run_model(model, feeds)
    unfuse = UnfuseAttentionPass()
    unfuse.context = PipelineContext()
    unfuse(model)
    assert not any(n.op_type == "MultiHeadAttention" for n in model.graph)
    np.testing.assert_allclose(run_model(model, feeds), want, rtol=1e-5, atol=1e-5)


def _reproduced_with_every_block_selected(model: ir.Model, fused_vit, path) -> None:
    """`model` (the fused ViT with its attention in another form, saved at `path`) computes what
    the fused ViT does, and so does it with every block selected (its attention written out)."""
    ir.save(model, path)
    x = pixels()
    want = run_model(ir.load(fused_vit), {"pixel_values": x})
    np.testing.assert_allclose(run_model(ir.load(path), {"pixel_values": x}), want, rtol=1e-5, atol=1e-5)
    sparse, reports = apply_recipe(path, "sparse_attention", block_size=8, top_k=9)
    assert reports["unfuse_attention"]["unfused"] == 4
    np.testing.assert_allclose(run_model(sparse, {"pixel_values": x}), want, rtol=1e-5, atol=1e-5)


def test_the_packed_attention_with_key_counts_is_onnx_runtimes(fused_vit):
    """The packed Attention's mask_index of [B] key counts (the keys from each count on masked)."""
    from trimrt.passes import UnfuseAttentionPass
    from trimrt.passes.base import PipelineContext

    model = ir.load(fused_vit)
    counts = ir.Value(name="key_counts", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([2]))
    model.graph.inputs.append(counts)
    _pack(model, mask_index=counts)
    feeds = {"pixel_values": pixels(), "key_counts": np.array([65, 50], np.int32)}
    want = run_model(model, feeds)
    assert not np.allclose(want[0], run_model(model, {**feeds, "key_counts": np.array([50, 50], np.int32)})[0])
    unfuse = UnfuseAttentionPass()
    unfuse.context = PipelineContext()
    unfuse(model)
    assert not any(n.op_type == "Attention" for n in model.graph)
    np.testing.assert_allclose(run_model(model, feeds), want, rtol=1e-5, atol=1e-5)


def _pack(model: ir.Model, mask_index: ir.Value | None = None) -> None:
    """The fused ViT's MultiHeadAttention ops, with the packed Q/K/V projection before each, as
    ONNX Runtime's packed Attention (reading `mask_index` when given)."""
    for node in [n for n in model.graph if n.op_type == "MultiHeadAttention"]:
        value = node.inputs[0]
        while value.producer().op_type != "Add":  # the views of the packed projection's output
            value = value.producer().inputs[0]
        add = value.producer()
        matmul = add.inputs[0].producer()
        packed = ir.node("Attention", [matmul.inputs[0], matmul.inputs[1], add.inputs[1], mask_index],
                         domain="com.microsoft", attributes={"num_heads": node.attributes.get_int("num_heads")})
        model.graph.insert_before(node, packed)
        ir.convenience.replace_all_uses_with(node.outputs[0], packed.outputs[0])
        model.graph.remove(node, safe=True)
    ir.passes.common.RemoveUnusedNodesPass()(model)
