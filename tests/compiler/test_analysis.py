"""Structure analysis on exported graphs: blocks, token axis, attention, pooling; clear errors."""

from __future__ import annotations

import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from trimrt.compiler.analysis import analyse, infer_shapes
from trimrt.errors import StructureError


def load(path) -> ir.Model:
    model = ir.load(path)
    infer_shapes(model)
    return model


@pytest.mark.parametrize("which", ["tiny_vit_onnx", "tiny_vit_sdpa_onnx"])
def test_finds_vit_structure(which, request):
    _, path = request.getfixturevalue(which)
    tmap = analyse(load(path))
    assert len(tmap.blocks) == 4
    assert tmap.token_axis == 1 and tmap.num_tokens == 65 and tmap.width == 64
    assert tmap.pooling == "cls"
    assert all(not b.post_norm for b in tmap.blocks)
    assert [b.attention.num_heads for b in tmap.blocks] == [4] * 4
    # each block's stream_in is the previous block's output stream
    for prev, block in zip(tmap.blocks, tmap.blocks[1:]):
        assert block.stream_in.producer().op_type == "Add"
        assert block.index == prev.index + 1


def test_scale_is_found_on_explicit_attention(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    tmap = analyse(load(path))
    assert tmap.blocks[0].attention.scale == pytest.approx(16 ** -0.5)


def test_graph_without_attention_says_what_is_missing():
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = oh.make_graph([oh.make_node("Relu", ["x", ], ["h"]), oh.make_node("Softmax", ["h"], ["y"])], "mlp", [x], [y])
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    with pytest.raises(StructureError, match=r"no transformer blocks found: no attention .* \(1 Softmax node\(s\)\)"):
        analyse(model)
