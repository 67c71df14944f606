"""Triton kernels of the custom ops (item 4 of the op contract), one module per op.

Each module imports triton and torch at its top, so it is only ever imported lazily:
through `OpDef.run_triton` (the op's `triton = "module:function"` entry) or from the
TensorRT plugin glue. Every module exposes

- `run(*inputs, **attributes, out=None)`: launch on torch tensors, return the outputs
  (the same tuple as the NumPy reference); `out` lets a caller (the TensorRT plugin)
  supply the output buffers;
- `scalar_args`, `grid`, `constexprs`: the kernel's launch arguments computed from the
  input shapes, written so that they work on plain ints (here) and on TensorRT symbolic
  shape expressions (the plugin's `aot_impl`, `sym` = `tensorrt.plugin`), so both paths
  launch the same kernel the same way (shape expressions have +, -, * and // but no
  reflected operators: keep them on the left); a selection op's span and k are
  `span.Span`'s, on both, so they always equal TokenPrune's;
- `compile_kernel(dtypes, *, <sizes>, target=None)`: the kernel compiled ahead of time
  (`_launch.aot_compile`: PTX for `aot_impl`) for `target` (default: the current GPU)
  and inputs of at most those sizes, `dtypes` naming the Triton types ("fp32", "fp16",
  "bf16") of the float inputs and outputs by name; its launch passes the pointers and
  `scalar_args` in order, without the attributes it bakes in as constants;
- the TensorRT hooks `trt_output_shapes` and `trt_aot`.

What they share (block sizes, tiles, output buffers, the AOT compile and launch) is in
`_launch.py`.

On a machine without a GPU the kernels run under the Triton interpreter: set
`TRITON_INTERPRET=1` before importing a module here (the kernels are defined at import).
"""
