"""The quantization registries declare what the recipe and the pass used to spell out in
tables: each method's formats, method-only keys and statistics, each encoding's format,
targets and opsets."""

from __future__ import annotations

import numpy as np
import pytest

from trimrt.errors import BuildError, RecipeError
from trimrt.quantization.encodings import encoding_for
from trimrt.quantization.methods import Linear, QuantizationMethod, quantize_linears
from trimrt.recipe import QUANT_COMBINATIONS, QuantizationOptions
from trimrt.recipe import quant_combinations as combinations
from trimrt.registry import QUANTIZATION_METHODS, QUANTIZED_ENCODINGS


def test_methods_declare_the_recipe_combinations_and_keys():
    assert QUANTIZATION_METHODS.names() == ("rtn", "smoothquant", "awq", "gptq")
    assert combinations() == QUANT_COMBINATIONS and list(combinations()) == list(QUANT_COMBINATIONS)
    assert {m: QUANTIZATION_METHODS[m].recipe_keys for m in QUANTIZATION_METHODS} == {
        "rtn": (), "smoothquant": ("alpha",), "awq": (), "gptq": ()}
    assert [m for m in QUANTIZATION_METHODS if not QUANTIZATION_METHODS[m].needs_calibration] == ["rtn"]
    for name in QUANTIZATION_METHODS:
        method = QUANTIZATION_METHODS[name]
        assert issubclass(method, QuantizationMethod)
        assert method.statistics | method.held_out_statistics <= {"absmax", "rows", "hessian"}


def test_each_format_and_target_has_one_encoding():
    assert QUANTIZED_ENCODINGS.names() == ("int8_dynamic", "int4_matmul_nbits", "int4_blocked_dq", "qdq_int8",
                                           "qdq_fp8")
    chosen = {(f, t): encoding_for(f, t) for f in ("int8", "int4", "fp8") for t in ("onnxruntime", "tensorrt")}
    assert chosen == {("int8", "onnxruntime"): "int8_dynamic", ("int8", "tensorrt"): "qdq_int8",
                      ("int4", "onnxruntime"): "int4_matmul_nbits", ("int4", "tensorrt"): "int4_blocked_dq",
                      ("fp8", "onnxruntime"): "qdq_fp8", ("fp8", "tensorrt"): "qdq_fp8"}
    assert [e for e in QUANTIZED_ENCODINGS if QUANTIZED_ENCODINGS[e].static_activations] == ["qdq_int8", "qdq_fp8"]
    with pytest.raises(BuildError, match="no quantized encoding"):
        encoding_for("int3", "onnxruntime")


def test_a_method_refuses_formats_it_does_not_declare():
    linears = [Linear("fc", "x", np.ones((32, 8), np.float32))]
    with pytest.raises(RecipeError, match="does not build"):
        quantize_linears(QuantizationOptions(weights="int4", activations="none", method="smoothquant"), linears, {})
