"""What every kernel module shares: block sizes, grids, tile loads and stores, output
buffers, the ahead-of-time compile and the TensorRT `aot_impl` launch.

Imports torch and triton at its top, like the kernel modules (only ever imported lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import BackendUnavailableError


def block(size, largest: int | None = None, smallest: int = 1) -> int:
    """The power-of-two block covering `size` (a concrete int), clamped to [smallest, largest]."""
    b = triton.next_power_of_2(max(int(size), 1))
    return max(smallest, min(b, largest) if largest is not None else b)


def output_buffers(op: str, out, device, *wanted: tuple[tuple, torch.dtype]) -> tuple:
    """The output tensors of a `run`: `out` (the caller's buffers, e.g. TensorRT's) after
    checking their shapes, else new empty ones; `wanted`: (shape, dtype) per output."""
    if out is None:
        return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in wanted)
    got, shapes = [tuple(t.shape) for t in out], [tuple(shape) for shape, _ in wanted]
    if got != shapes:
        raise ValueError(f"{op}: output buffers {got} are not {shapes}")
    return tuple(out)


def one_program_per_sample(first_shape, *shapes, cdiv=triton.cdiv) -> tuple:
    """The launch grid (B,) of a kernel with one program per sample (B: the first input's dim 0)."""
    return (first_shape[0],)


@triton.jit
def load_tile(ptr, rows, row_mask, cols, col_mask, row_stride):
    """ptr[rows, cols] of a row-major matrix of `row_stride` columns, 0 where a mask is off."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                   other=0.0)


@triton.jit
def store_tile(ptr, rows, row_mask, cols, col_mask, row_stride, value):
    """ptr[rows, cols] = value (in ptr's element type) where both masks are on."""
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def without_features(run, x, *inputs, outs: tuple, **attrs) -> tuple:
    """`run`'s outputs `outs` for tokens x without features (D = 0): the kernels write
    their index outputs from their feature blocks, so these come from a run on one zero
    feature (the outputs with a feature axis are empty)."""
    for buffer, value in zip(outs, run(x.new_zeros((*x.shape[:-1], 1)), *inputs, **attrs)):
        if buffer.numel():
            buffer.copy_(value)
    return outs


def aot_compile(kernel, pointers: dict[str, str], consts: dict, target=None):
    """Compile `kernel` ahead of time for `target` (default: the current GPU).

    `pointers` maps each pointer parameter to its Triton element type ("fp32", "fp16",
    "bf16", "i64"); `consts` are baked in as constexprs; every other parameter is an int32
    scalar. Returns the `triton.compiler.CompiledKernel` (name, PTX in `.asm["ptx"]`,
    metadata); its launch passes the pointers and int32 scalars in the kernel's order."""
    signature = {name: "constexpr" if name in consts else f"*{pointers[name]}" if name in pointers else "i32"
                 for name in kernel.arg_names}
    return triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts), target=target)


# ------------------------------------------------ TensorRT aot_impl (tensorrt imported lazily)


def triton_types(*descs: dict) -> dict[str, str]:
    """Triton's names of the dtypes of tensor descriptors by name (for compiling a kernel
    ahead of time), e.g. `triton_types(inputs, outputs)` -> {"x": "fp16", ...}."""
    import tensorrt as trt

    types = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16", trt.int64: "i64"}
    found = {name: types.get(desc.dtype) for named in descs for name, desc in named.items()}
    bad = [name for name, t in found.items() if t is None]
    if bad:
        raise BackendUnavailableError(f"the trimrt Triton kernels do not support the TensorRT dtypes of {bad}")
    return found


def largest(desc, axis: int) -> int:
    """Largest value dimension `axis` takes in this build (the profile max if dynamic)."""
    return int(desc.shape.max[axis] if desc.shape.is_dynamic else desc.shape[axis])


def launch(trtp, kernel, inputs: dict, grid, scalar_args, attrs: dict, **grid_options) -> tuple:
    """aot_impl's result: `kernel` launched on the kernel module's `grid` with its int32
    `scalar_args`, both of the inputs' shape expressions (in the op's input order)."""
    shapes = [desc.shape_expr for desc in inputs.values()]
    blocks = grid(*shapes, cdiv=trtp.cdiv, **grid_options)
    scalars = scalar_args(*shapes, **attrs, sym=trtp)
    if getattr(kernel.metadata, "global_scratch_size", 0):
        raise BackendUnavailableError(f"{kernel.metadata.name} needs Triton global scratch, unsupported by AOT plugins")
    params = trtp.KernelLaunchParams()
    params.grid_x = blocks[0]
    if len(blocks) > 1:
        params.grid_y = blocks[1]
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
    return kernel.metadata.name, kernel.asm["ptx"], params, extra
