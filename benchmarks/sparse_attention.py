"""Block-sparse attention alone on ONNX Runtime CPU: trimrt's BlockSparseAttention (its ONNX
decomposition) against ONNX Runtime's fused dense MultiHeadAttention.

One attention of 8 heads of 64 features over N tokens (batch 1), blocks of 128 tokens.
For each N and block density (top_k / blocks), both models take turns after a warm-up
(medians of the paired ratios, 2 threads, spinning off). The FLOPs ideal is the
density's (1 / density for the QKᵀ and PV products; the selection is O(blocks²)).
Fidelity: relative L2 error of the output against exact attention, without rectification,
rectified per token (the default) and per block (Rectified SpaAttn's published formula),
on inputs with locality (queries, keys and values that vary smoothly along the sequence
plus noise, as patches of an image do) at a logit scale where the attention is spread,
on the same with keys equal to the queries (each token attends itself and its
neighbours most), and on random inputs.

    python benchmarks/sparse_attention.py [--tokens 4096 8192 16384] [--density 0.25 0.125] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort

from trimrt.bench import paired_speedup, time_alternating
from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins.base import FUNCTION_OPSET

HEADS, DIM, BLOCK = 8, 64, 128
OP = REGISTRY["BlockSparseAttention"]


def sparse_model(n: int, top_k: int, rectify: int) -> bytes:
    attrs = OP.attribute_values({"block_size": BLOCK, "top_k": top_k, "rectify": rectify, "scale": DIM**-0.5})
    node = oh.make_node(OP.name, ["q", "k", "v", "key_bias"], ["out"], domain=DOMAIN, **attrs)
    io = [oh.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, HEADS, n, DIM]) for x in ("q", "k", "v", "out")]
    bias = onnx.numpy_helper.from_array(np.zeros((1, n), np.float32), "key_bias")  # no mask
    graph = oh.make_graph([node], "sparse", io[:3], io[3:], [bias])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", FUNCTION_OPSET), oh.make_opsetid(DOMAIN, 1)],
                         functions=[OP.function()]).SerializeToString()


def dense_model(n: int) -> bytes:
    """ONNX Runtime's fused MultiHeadAttention (com.microsoft) on [1, N, heads·dim] inputs."""
    node = oh.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=HEADS,
                        scale=DIM**-0.5)
    io = [oh.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, n, HEADS * DIM]) for x in ("q", "k", "v", "out")]
    graph = oh.make_graph([node], "dense", io[:3], io[3:])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)]
                         ).SerializeToString()


def session(model: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def local_inputs(rng, n: int) -> list[np.ndarray]:
    t = np.arange(n)[:, None] / n
    basis = np.concatenate([np.sin(2 * np.pi * f * t + rng.random()) for f in rng.uniform(0.5, 4, DIM)], axis=1)
    return [(basis + 0.3 * rng.standard_normal((1, HEADS, n, DIM))).astype(np.float32) for _ in range(3)]


def exact(q, k, v, scale) -> np.ndarray:
    logits = np.einsum("bhnd,bhmd->bhnm", q, k) * scale
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


def fidelity(n: int, densities: list[float]) -> None:
    rng = np.random.default_rng(0)
    blocks = -(-n // BLOCK)
    print(f"\nrelative L2 error of the output, {n} tokens (blocks of {BLOCK}, {blocks} blocks):")
    print("| inputs | density | top_k | unrectified | rectified per token | rectified per block (published) |")
    print("|---|---|---|---|---|---|")
    q, k, v = local_inputs(rng, n)
    for label, (q, k, v), scale in [("locality, spread attention", (q, k, v), 2 * DIM**-0.5),
                                    ("locality, keys = queries (self-similar)", (q, q, v), DIM**-0.5),
                                    ("random", [rng.standard_normal((1, HEADS, n, DIM)).astype(np.float32)
                                                for _ in range(3)], DIM**-0.5)]:
        want = exact(q, k, v, scale)
        for density in densities:
            top_k = max(1, round(density * blocks))
            unmasked = np.zeros((1, n), np.float32)
            errors = [np.linalg.norm(OP.run_reference(q, k, v, unmasked, block_size=BLOCK, top_k=top_k, sink=1,
                                                      local=1, causal=0, rectify=r, scale=scale)[0] - want)
                      / np.linalg.norm(want) for r in (0, 1, 2)]
            print(f"| {label} | {density:.3g} | {top_k} | {errors[0]:.4f} | {errors[1]:.4f} | {errors[2]:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--density", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fidelity-tokens", type=int, default=2048, help="sequence of the error table (the reference "
                    "is NumPy: its memory grows with N²)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"attention of {HEADS} heads × {DIM}, blocks of {BLOCK}; ONNX Runtime {ort.__version__}, {args.threads} "
          f"threads, spinning off; {args.rounds} rounds after 2 warm-up runs, medians")
    print("\n| tokens | density | top_k | dense MHA | sparse, rectified | speedup (share of ideal) | "
          "sparse, unrectified | speedup (share of ideal) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.tokens:
        q, k, v = (rng.standard_normal((1, HEADS, n, DIM)).astype(np.float32) for _ in range(3))
        dense = session(dense_model(n), args.threads)
        dense_feeds = {name: x.transpose(0, 2, 1, 3).reshape(1, n, HEADS * DIM) for name, x in zip("qkv", (q, k, v))}
        blocks = -(-n // BLOCK)
        for density in args.density:
            top_k = max(1, round(density * blocks))
            row = [f"| {n} | {density:.3g} | {top_k} "]
            for rectify in (1, 0):
                sparse = session(sparse_model(n, top_k, rectify), args.threads)
                t_dense, t_sparse = time_alternating(lambda: dense.run(None, dense_feeds),
                                                     lambda: sparse.run(None, {"q": q, "k": k, "v": v}),
                                                     warmup=2, rounds=args.rounds)
                speedup = paired_speedup(t_dense, t_sparse)
                ideal = blocks / top_k
                if rectify:
                    row.append(f"| {statistics.median(t_dense) * 1e3:.0f} ms ")
                row.append(f"| {statistics.median(t_sparse) * 1e3:.0f} ms | {speedup:.2f}× ({100 * speedup / ideal:.0f}%) ")
            print("".join(row) + "|", flush=True)
    fidelity(args.fidelity_tokens, args.density)


if __name__ == "__main__":
    main()
