"""FLOPs of a model on concrete inputs: the ideal speedup of a build is flops(base)/flops(build).

Shapes after token-reducing ops are only known at run time (TopK k lives in a function
attribute), so the count runs the model once on ONNX Runtime with every MatMul / Gemm /
Conv input and output exposed, and reads the real shapes. Counts are multiply-adds × 2
of those ops, which carry nearly all the compute of a transformer; INT8 MatMulInteger
counts like MatMul, INT4 MatMulNBits too (the ratio is then the token saving; the
quantization gain is measured), and ONNX Runtime's fused MultiHeadAttention, the
opset-23 Attention and ONNX Runtime's GroupQueryAttention (decoder builds) count their two
attention products. The products inside If branches count in the branch the inputs take.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnx.inliner

from .onnx_runner import OnnxRunner

#: attention ops whose second output is the present key (past and new keys)
_CACHED_ATTENTION = ("Attention", "GroupQueryAttention")
_COUNTED = ("MatMul", "MatMulInteger", "MatMulNBits", "Gemm", "Conv", "MultiHeadAttention", *_CACHED_ATTENTION)


def count_flops(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int:
    inlined = _take_branches(onnx.inliner.inline_local_functions(model), feeds)
    nodes = [n for n in inlined.graph.node if n.op_type in _COUNTED]
    # shapes known without running: the feeds (graph inputs) and the initializers
    known = {name: tuple(np.shape(value)) for name, value in feeds.items()}
    known.update({i.name: tuple(i.dims) for i in inlined.graph.initializer})
    wanted = list(dict.fromkeys(  # in order, each once
        name for n in nodes for name in (n.input[0], n.output[0], *_keys(n)) if name not in known))
    # the run returns the shapes of exactly the values wanted (never the values: an N × N
    # attention product of a long sequence would stay in memory for every block)
    shapes = _shapes_of(inlined, wanted, feeds) if wanted else {}
    shape = lambda name: shapes[name] if name in shapes else known.get(name)  # noqa: E731
    total = 0
    for n in nodes:
        a, out = shape(n.input[0]), shape(n.output[0])
        if a is None or out is None:
            continue
        ints = {at.name: at.i for at in n.attribute}
        if n.op_type == "MultiHeadAttention":  # fused attention: Q·Kᵀ and P·V, 2·Sq·Sk·D each
            key = shape(n.input[1])
            if key is not None and len(a) == 3 and len(key) == 3:
                total += 4 * int(a[0]) * int(a[1]) * int(key[1]) * int(a[2])
        elif n.op_type in _CACHED_ATTENTION:  # Q·Kᵀ and P·V over all T keys (the present key has them, past included)
            keys = shape(_keys(n)[0])
            if keys is not None:
                total += 4 * int(np.prod(out)) * int(keys[2] if len(keys) == 4 else keys[1])
        elif n.op_type == "Conv":
            w = shape(n.input[1])
            if w is not None:
                total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type == "MatMulNBits":  # B is packed: K is an attribute
            total += 2 * int(np.prod(out)) * int(ints["K"])
        else:  # MatMul, MatMulInteger (integer multiply-adds count as operations too), Gemm
            total += 2 * int(np.prod(out)) * int(a[0] if ints.get("transA") else a[-1])
    return total


def _shapes_of(model: onnx.ModelProto, names: list[str], feeds: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    """The run-time shapes of the values `names`: a Shape node on each, the shapes the only outputs."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {name: f"{name}__trimrt_shape" for name in names}
    shape_of = lambda name: onnx.helper.make_node("Shape", [name], [outputs[name]], name=outputs[name])  # noqa: E731
    # each Shape right after its value's producer (OnnxRunner runs Shape nodes as soon as they
    # can): a value is freed after its last reader, so no product waits for its Shape
    nodes = [shape_of(i.name) for i in probe.graph.input if i.name in outputs]
    for node in probe.graph.node:
        nodes.append(node)
        nodes.extend(shape_of(out) for out in node.output if out in outputs)
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    got = OnnxRunner(probe, list(outputs.values()), replace=True, optimize="disable").run(feeds)
    return {name: tuple(int(d) for d in got[out]) for name, out in outputs.items()}


def _take_branches(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], rounds: int = 4) -> onnx.ModelProto:
    """The model with each If of its main graph replaced by the branch these feeds take (its
    nodes, its outputs renamed to the If's), so the products inside branches are counted;
    nested Ifs come up a level per round."""
    for _ in range(rounds):
        ifs = [n for n in model.graph.node if n.op_type == "If"]
        if not ifs:
            break
        conditions = OnnxRunner(model, [n.input[0] for n in ifs], replace=True, optimize="disable").run(feeds)
        nodes = []
        for n in model.graph.node:
            if n.op_type != "If":
                nodes.append(n)
                continue
            branch = next(a.g for a in n.attribute if a.name == ("then_branch" if bool(conditions[n.input[0]])
                                                                  else "else_branch"))
            nodes.extend(branch.node)
            nodes.extend(onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{n.name}_taken_{i}")
                         for i, (inner, outer) in enumerate(zip(branch.output, n.output)))
        model = onnx.ModelProto.FromString(model.SerializeToString())
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def _keys(node: onnx.NodeProto) -> tuple[str, ...]:
    """The value giving an attention node's key count: MultiHeadAttention's key input; the
    Attention op's present key (past and new keys) when it returns one, else its key input."""
    if node.op_type == "MultiHeadAttention":
        return tuple(node.input[1:2])
    if node.op_type in _CACHED_ATTENTION:
        return (node.output[1],) if len(node.output) > 1 and node.output[1] else (node.input[1],)
    return ()
