"""Triton kernels of the custom ops, one module per op (`run`, the launch arguments on ints
and TensorRT shape expressions, `compile_kernel`, the TensorRT hooks: docs/adding_an_op.md,
section 2); what they share is in `_launch.py`.

Each module imports triton and torch at its top, so it is only ever imported lazily. On a
machine without a GPU the kernels run under the Triton interpreter: set
`TRITON_INTERPRET=1` before importing a module here (the kernels are defined at import).
"""
