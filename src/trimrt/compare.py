"""Output comparison: the one definition of the numbers trimrt reports and guards on
(verify's metrics, the quantization guard's cosine, the fusion check's relative L2), in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError


@dataclass
class OutputMetrics:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine_mean: float
    cosine_min: float
    top1: float | None  # fraction of samples with the same argmax (logits only)


def sample_cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity per sample (first axis), float64; 1 where both are zero."""
    g, r = (a.astype(np.float64).reshape(a.shape[0] if a.ndim else 1, -1) for a in (got, ref))
    denom = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    return np.where(denom > 0, (g * r).sum(axis=1) / np.maximum(denom, 1e-30), 1.0)


def compare_outputs(name: str, got: np.ndarray, ref: np.ndarray) -> OutputMetrics:
    if got.shape != ref.shape:
        raise InputError(f"output {name!r}: build shape {list(got.shape)} differs from the reference {list(ref.shape)}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(g - r)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(r), 1e-6)).max(initial=0.0))
    cos = sample_cosines(got, ref)
    top1 = None
    if "logit" in name.lower() and got.ndim == 2 and got.shape[1] > 1 and np.issubdtype(got.dtype, np.floating):
        top1 = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
    return OutputMetrics(name, list(got.shape), max_abs, max_rel, float(cos.mean()), float(cos.min()), top1)


def retrieval_agreement(queries_ref: np.ndarray, corpus_ref: np.ndarray, queries_got: np.ndarray,
                        corpus_got: np.ndarray, k: int = 5, *, leave_one_out: bool = False) -> tuple[float, float]:
    """How well a build's embeddings keep the original's nearest neighbours: each query
    ranks the corpus by cosine, once with the original's embeddings and once with the
    build's; returns (top-1 agreement: the same nearest item, recall@k: the share of the
    original's k nearest the build also ranks in its k nearest). `leave_one_out`: the
    queries are the corpus and an item never retrieves itself."""
    def unit(x):
        x = x.astype(np.float64).reshape(x.shape[0], -1)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)

    def ranking(queries, corpus):
        sims = unit(queries) @ unit(corpus).T
        if leave_one_out:
            np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    k = min(k, corpus_ref.shape[0] - int(leave_one_out))
    if k < 1:
        raise InputError("retrieval needs at least 2 evaluation samples")
    ref, got = ranking(queries_ref, corpus_ref), ranking(queries_got, corpus_got)
    top1 = float(np.mean(ref[:, 0] == got[:, 0]))
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, got)]))
    return top1, recall


def next_token_nll(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, int]:
    """A language model's summed negative log-likelihood of each next token (tokens[:, 1:]
    predicted by logits[:, :-1], in float64) and how many tokens were counted; `mask`
    (1 = a real token) leaves padding out. Perplexity is exp(nll / count)."""
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, tokens[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    counted = np.ones(picked.shape, bool) if mask is None else (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    return float(-picked[counted].sum()), int(counted.sum())


def mean_cosine(reference: Sequence[Mapping[str, np.ndarray]], got: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Over runs (one dict of outputs per run): each float output's mean cosine over the
    runs, each run's output taken as one flat vector; the worst output's value."""
    worst = 1.0
    for name, first in reference[0].items():
        if not np.issubdtype(first.dtype, np.floating):
            continue
        values = []
        for ref, out in zip(reference, got):
            a, b = ref[name].astype(np.float64).ravel(), out[name].astype(np.float64).ravel()
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            values.append(float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b)))
        worst = min(worst, float(np.mean(values)))
    return worst


def relative_l2(reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float | None:
    """Largest ‖got − ref‖ / ‖ref‖ over the outputs; inf when an integer output differs,
    None when an output is missing or of another shape."""
    worst = 0.0
    for name, ref in reference.items():
        out = got.get(name)
        if out is None or out.shape != ref.shape:
            return None
        if not np.issubdtype(ref.dtype, np.floating):
            if not np.array_equal(out, ref):
                return float("inf")
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        worst = max(worst, float(np.linalg.norm(out64 - ref64) / max(np.linalg.norm(ref64), 1e-12)))
    return worst
