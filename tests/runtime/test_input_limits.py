"""Input limits found at compile time (trimrt.compiler.input_limits): the vocabulary of each
integer input and the position-table length, on hand-built embedding stages written the
ways exporters write them. The runtime checks feeds against them (test_bad_builds.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import trimrt
from trimrt.compiler.input_limits import find_input_limits
from trimrt.errors import InputError

VOCAB, WIDTH = 50, 8


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inits, *, tokens="tokens"):
    """input_ids [batch, tokens] -> word embedding (+ whatever `nodes` add) -> `out`."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", tokens])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["wte", "input_ids"], ["words"], name="word_embeddings")] + nodes,
        "embeddings", [ids], [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", tokens, WIDTH])],
        [_const("wte", np.random.default_rng(0).standard_normal((VOCAB, WIDTH)).astype(np.float32)), *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _table(name, rows):
    return _const(name, np.random.default_rng(1).standard_normal((rows, WIDTH)).astype(np.float32))


def _token_count():
    """n = input_ids.shape[1] as a scalar."""
    return [helper.make_node("Shape", ["input_ids"], ["n1"], start=1, end=2),
            helper.make_node("Squeeze", ["n1"], ["n"])]


def gpt2_range():
    """positions = arange(n) (GPT-2, LLaMA-style exports)."""
    nodes = _token_count() + [
        helper.make_node("Range", ["zero", "n", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "axis0"], ["pos2"]),
        helper.make_node("Gather", ["wpe", "pos2"], ["positions"], name="position_embeddings"),
        helper.make_node("Add", ["words", "positions"], ["out"]),
    ]
    return _model(nodes, [_table("wpe", 16), _const("zero", np.int64(0)), _const("one", np.int64(1)),
                          _const("axis0", np.array([0], np.int64))]), 16, "position_embeddings"


def bert_buffers():
    """A position buffer and an all-zero token-type buffer, both sliced to n (BERT): only the
    first counts positions; the token types stay 0 however long the input."""
    nodes = [helper.make_node("Shape", ["input_ids"], ["end"], start=1, end=2),
             helper.make_node("Slice", ["position_ids", "start", "end", "axis1"], ["pos"]),
             helper.make_node("Gather", ["wpe", "pos"], ["positions"], name="position_embeddings"),
             helper.make_node("Slice", ["token_type_ids", "start", "end", "axis1"], ["types"]),
             helper.make_node("Gather", ["tte", "types"], ["type_emb"], name="token_type_embeddings"),
             helper.make_node("Add", ["words", "positions"], ["sum"]),
             helper.make_node("Add", ["sum", "type_emb"], ["out"])]
    inits = [_table("wpe", 20), _table("tte", 2), _const("position_ids", np.arange(20, dtype=np.int64)[None]),
             _const("token_type_ids", np.zeros((1, 20), np.int64)), _const("start", np.array([0], np.int64)),
             _const("axis1", np.array([1], np.int64))]
    return _model(nodes, inits), 20, "position_embeddings"


def roberta_offset():
    """positions = cumsum(ids != pad) * (ids != pad) + pad, pad = 1 (RoBERTa): a table of 18
    rows holds 16 tokens."""
    nodes = [helper.make_node("Equal", ["input_ids", "pad"], ["is_pad"]),
             helper.make_node("Not", ["is_pad"], ["real"]),
             helper.make_node("Cast", ["real"], ["mask"], to=TensorProto.INT64),
             helper.make_node("CumSum", ["mask", "axis"], ["count"]),
             helper.make_node("Mul", ["count", "mask"], ["counted"]),
             helper.make_node("Add", ["counted", "pad"], ["pos"]),
             helper.make_node("Gather", ["wpe", "pos"], ["positions"], name="position_embeddings"),
             helper.make_node("Add", ["words", "positions"], ["out"])]
    return _model(nodes, [_table("wpe", 18), _const("pad", np.int64(1)), _const("axis", np.int64(1))]), 16, \
        "position_embeddings"


def quantized_words_no_positions():
    """An INT8 word table dequantized before the Gather, ids reshaped flat first (dynamo GPT-2);
    no position table: no token limit."""
    graph_nodes = [helper.make_node("Reshape", ["input_ids", "flat"], ["ids_flat"]),
                   helper.make_node("DequantizeLinear", ["wte_q", "scale"], ["wte_f"]),
                   helper.make_node("Gather", ["wte_f", "ids_flat"], ["out"], name="qwords")]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])
    graph = helper.make_graph(graph_nodes, "q", [ids], [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", WIDTH])],
                              [_const("wte_q", np.ones((VOCAB, WIDTH), np.int8)), _const("scale", np.float32(0.1)),
                               _const("flat", np.array([-1], np.int64))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), None, "qwords"


def static_tokens():
    """A static token count: the feed check fixes the count, so no position limit is recorded."""
    model, _, _ = gpt2_range()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 12
    return model, None, None


@pytest.mark.parametrize("make", [gpt2_range, bert_buffers, roberta_offset, quantized_words_no_positions,
                                  static_tokens])
def test_vocabulary_and_positions_are_found(make):
    model, positions, node = make()
    onnx.checker.check_model(model)
    limits = find_input_limits(model)
    word_node = "qwords" if make is quantized_words_no_positions else "word_embeddings"
    assert limits["ids"] == {"input_ids": {"limit": VOCAB, "node": word_node}}
    if positions is None:
        assert limits["tokens"] is None
    else:
        assert limits["tokens"] == {"limit": positions, "node": node, "inputs": ["input_ids"]}


@pytest.mark.parametrize("make", [gpt2_range, roberta_offset])
def test_the_limit_is_exact(make, tmp_path):
    """The recorded limit is the longest input the model runs: one token more fails in ONNX Runtime."""
    import onnxruntime as ort

    model, positions, _ = make()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"input_ids": np.full((1, positions), 5, np.int64)})
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(None, {"input_ids": np.full((1, positions + 1), 5, np.int64)})


def test_a_compiled_build_checks_its_limits(tmp_path):
    """compile records the limits in the manifest; the Session refuses feeds beyond them."""
    model, positions, _ = gpt2_range()
    onnx.save(model, tmp_path / "m.onnx")
    example = {"input_ids": np.arange(16, dtype=np.int64).reshape(2, 8)}  # random check feeds would exceed the limits
    manifest = trimrt.compile(str(tmp_path / "m.onnx"), None, tmp_path / "b", example_inputs=example)
    assert manifest["input_limits"]["tokens"]["limit"] == positions
    session = trimrt.load(tmp_path / "b")
    assert session.run({"input_ids": np.full((2, positions), VOCAB - 1, np.int64)})["out"].shape == (2, positions, WIDTH)
    with pytest.raises(InputError, match=f"has {positions + 1} tokens; this model has {positions} positions"):
        session.run({"input_ids": np.zeros((1, positions + 1), np.int64)})
    with pytest.raises(InputError, match=f"token id {VOCAB} at \\[1, 2\\] is outside the vocabulary of {VOCAB}"):
        session.run({"input_ids": np.array([[0, 1, 2], [3, 4, VOCAB]], np.int64)})
