"""Quantization for trimrt builds (issue 5).

The algorithms are plain NumPy on [K, N] = [in_features, out_features] weights and
[M, K] activations, free of any graph: `numerics` (INT8 / INT4 / FP8 rounding and the
ONNX quantizers' arithmetic), `smoothquant`, `awq` and `gptq` decide the numbers;
`encodings` decides how a target runs them. The quantization pass ties them together.
"""
