"""PackedProjectionsPass: MatMuls of one input by their own constant weights become one MatMul
and a Split, with the same outputs; shared weights, graph outputs and lone MatMuls stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from trimrt.passes.packed_projections import PackedProjectionsPass


def _model(rng) -> ir.Model:
    """x [B, S, 8] projected by q, k, v (8 -> 8, 4, 4); y = x · w_tied twice (a shared weight);
    z = h · w_lone (a lone MatMul); r = x · w_out (a graph output)."""
    w = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in
         (("wq", (8, 8)), ("wk", (8, 4)), ("wv", (8, 4)), ("w_tied", (8, 4)), ("w_lone", (24, 3)), ("w_out", (8, 2)))}
    nodes = [helper.make_node("MatMul", ["x", n], [n[1:]]) for n in ("wq", "wk", "wv")]
    nodes += [helper.make_node("MatMul", ["x", "w_tied"], ["t1"]), helper.make_node("MatMul", ["h", "w_tied"], ["t2"]),
              helper.make_node("Concat", ["q", "k", "v", "t1", "t2"], ["qkv"], axis=-1),
              helper.make_node("MatMul", ["qkv", "w_lone"], ["lone"]),
              helper.make_node("MatMul", ["x", "w_out"], ["r"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", 8]) for n in ("x", "h")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("lone", "r")],
        [numpy_helper.from_array(a, n) for n, a in w.items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(model: ir.Model, feeds) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_projections_of_one_input_are_packed_with_the_same_outputs():
    rng = np.random.default_rng(0)
    model = _model(rng)
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("x", "h")}
    want = _run(model, feeds)
    pass_ = PackedProjectionsPass()
    assert pass_(model).modified
    assert pass_.report == {"packed_groups": 1, "matmuls_packed": 3,  # q, k, v; not the tied, lone or output ones
                            "attention_fed_packed": 0}
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert len(matmuls) == 5 and sum(n.op_type == "Split" for n in model.graph) == 1  # the packed ones are gone
    assert not {"wq", "wk", "wv"} & set(model.graph.initializers)
    packed = next(n for n in matmuls if n.inputs[1].const_value is not None and n.inputs[1].const_value.shape[1] == 16)
    assert packed.inputs[0].name == "x"
    for got, ref in zip(_run(model, feeds), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
