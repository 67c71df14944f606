"""Quantization, first slice: INT8 weights (per output channel, symmetric, round to
nearest) with activations quantized dynamically per tensor, for ONNX Runtime CPU builds.

Every MatMul of an activation by a constant 2-D weight W [K, N] becomes

    xq, x_scale, x_zp = DynamicQuantizeLinear(x)            (once per activation)
    y = Cast(MatMulInteger(xq, Wq, x_zp, 0)) · (x_scale · w_scale)

with Wq = round(W / w_scale) in [-127, 127], w_scale[n] = max|W[:, n]| / 127. This is
the form ONNX Runtime fuses into its INT8 CPU kernels (DynamicQuantizeMatMul), the
numerics of `quantize_dynamic(per_channel=True)`. It runs after the token passes, so
pruned and merged builds quantize the same way. MatMuls inside custom-op functions
(activation × activation) are left in float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import is_constant
from ..recipe import QuantizationOptions
from .base import TrimrtPass

INT8_MAX = 127


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Wq int8 [K, N], scale float32 [N]): symmetric per output channel, round to nearest."""
    scale = np.abs(w).max(axis=0).astype(np.float32) / INT8_MAX
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # an all-zero column stays zero
    q = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


class QuantizationPass(TrimrtPass):
    name = "quantization"

    def __init__(self, options: QuantizationOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        quantized_inputs: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
        count, bytes_before, bytes_after = 0, 0, 0
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            x, w = node.inputs
            weight = _constant_array(w)
            if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or is_constant(x):
                continue
            prefix = f"trimrt_quant_{count}"
            nodes = []
            if x not in quantized_inputs:
                dql = self.tagged(ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{prefix}_dql"))
                nodes.append(dql)
                quantized_inputs[x] = tuple(dql.outputs)
            xq, x_scale, x_zp = quantized_inputs[x]
            wq, w_scale = quantize_weight(weight)
            wq_v = self._initializer(graph, f"{prefix}_w", wq)
            zp_v = self._initializer(graph, f"{prefix}_w_zp", np.zeros(wq.shape[1], np.int8))
            scale_v = self._initializer(graph, f"{prefix}_w_scale", w_scale)
            mmi = self.std_node("MatMulInteger", [xq, wq_v, x_zp, zp_v], name=f"{prefix}_matmul")
            cast = self.std_node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{prefix}_cast")
            scales = self.std_node("Mul", [x_scale, scale_v], name=f"{prefix}_scales")
            out = self.std_node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{prefix}_out")
            nodes += [mmi, cast, scales, out]
            graph.insert_before(node, nodes)
            old = node.outputs[0]
            out.outputs[0].name, old.name = old.name, f"{old.name}_float"
            out.outputs[0].shape, out.outputs[0].dtype = old.shape, old.dtype
            old.replace_all_uses_with(out.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            count += 1
            bytes_before += weight.nbytes
            bytes_after += wq.nbytes + w_scale.nbytes + wq.shape[1]
        self.report = {"weights": "int8 per output channel (symmetric, round to nearest)",
                       "activations": "int8 dynamic per tensor", "encoding": "DynamicQuantizeLinear + MatMulInteger",
                       "matmuls_quantized": count, "weight_bytes_before": bytes_before,
                       "weight_bytes_after": bytes_after}
        return ir.passes.PassResult(model, modified=count > 0)

    @staticmethod
    def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        graph.register_initializer(value)
        return value


def _constant_array(value: ir.Value) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None
