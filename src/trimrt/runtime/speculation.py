"""Speculative decoding without a draft model: drafters that propose a tree of next tokens,
which the generator verifies in one forward pass of the decoder build (a tree attention
mask through its `attention_bias`, tree position ids) and accepts exactly as greedy
decoding would (see Generator).

- `PromptLookup`: the tokens that followed the last n-gram where it occurred before in the
  context (Hugging Face's `prompt_lookup_num_tokens`): a chain.
- `TokenRecycling` (Luo et al., 2025): a `vocab × k` table of the top-k successors last seen
  after each token; a static tree template is filled from it level by level, and every
  verified tree token's row is replaced by the top-k at its position.

A drafter's tree: `tokens[n]`, `parents[n]` (-1: the root, the last generated token, which
is fed first), nodes in breadth-first order (a parent before its children).
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

#: the names `generator(speculation=...)` takes
SPECULATIONS = ("prompt_lookup", "token_recycling")


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens below a root: `parents[i]` is the index of node i's parent (-1: the root)."""

    tokens: np.ndarray  # int64 [n]
    parents: np.ndarray  # int64 [n]

    def __post_init__(self):
        object.__setattr__(self, "tokens", np.asarray(self.tokens, np.int64))
        object.__setattr__(self, "parents", np.asarray(self.parents, np.int64))

    @property
    def depths(self) -> np.ndarray:
        """Each node's depth (the root's children: 1)."""
        return _shape_of(self.parents.tobytes())[0]

    def visible(self) -> np.ndarray:
        """[1 + n, 1 + n] bool over (root, nodes): row r sees column c when c is r or an ancestor of r."""
        return _shape_of(self.parents.tobytes())[1]

    def bias(self, width: int, dtype=np.float32) -> np.ndarray:
        """The additive attention bias of a step feeding the root and the tree last of `width`
        tokens [1, 1, 1 + n, width]: each sees the past, itself and its ancestors, nothing else."""
        block = _tree_block(self.parents.tobytes(), np.dtype(dtype))
        out = np.zeros((1, 1, len(block), width), block.dtype)
        out[0, 0, :, width - len(block):] = block
        return out

    @property
    def is_chain(self) -> bool:
        """Each node below the one before it: the causal mask is its mask."""
        return _shape_of(self.parents.tobytes())[2]

    def spine(self) -> "DraftTree":
        """The chain of first children from the root (a tree's most likely path, for graphs that
        can only verify a chain)."""
        keep, parent = [], -1
        for i, p in enumerate(self.parents):
            if p == parent:
                keep.append(i)
                parent = i
        return DraftTree(self.tokens[keep], np.arange(-1, len(keep) - 1, dtype=np.int64))

    def accepted_path(self, predicted: np.ndarray) -> list[int]:
        """The longest root-to-node path on which every draft equals the model's greedy choice at
        its parent (`predicted[r]`: the argmax at row r of (root, nodes)); node indices, root
        excluded; of equally long paths the first in breadth-first order."""
        if not len(self.tokens):
            return []
        right = self.tokens == predicted[self.parents + 1]
        ancestry = self.visible()[1:, 1:]  # node i's row: itself and its ancestors
        whole = ~(ancestry & ~right).any(axis=1)  # every node on the path from the root is right
        if not whole.any():
            return []
        best = int(np.argmax(np.where(whole, self.depths, 0)))
        return np.flatnonzero(ancestry[best]).tolist()  # ancestors come first in breadth-first order


@functools.lru_cache(maxsize=64)  # a drafter's trees share a few shapes (its template, chains)
def _shape_of(parents: bytes) -> tuple[np.ndarray, np.ndarray, bool]:
    """(depths, visible, is a chain) of a tree given as its parents array's bytes (read-only arrays)."""
    parents = np.frombuffer(parents, np.int64)
    depths = np.zeros(len(parents), np.int64)
    seen = np.eye(len(parents) + 1, dtype=bool)
    seen[:, 0] = True
    for i, parent in enumerate(parents):
        depths[i] = 1 if parent < 0 else depths[parent] + 1
        seen[i + 1] |= seen[parent + 1]  # a parent comes before its children
    depths.flags.writeable = seen.flags.writeable = False
    return depths, seen, bool(np.array_equal(parents, np.arange(-1, len(parents) - 1)))


@functools.lru_cache(maxsize=64)
def _tree_block(parents: bytes, dtype: np.dtype) -> np.ndarray:
    """The [1 + n, 1 + n] corner of DraftTree.bias: 0 where visible, the dtype's lowest elsewhere."""
    block = np.where(_shape_of(parents)[1], 0, np.finfo(dtype).min).astype(dtype)
    block.flags.writeable = False
    return block


EMPTY = DraftTree(np.zeros(0, np.int64), np.zeros(0, np.int64))


def one_shape(trees: list[DraftTree], live: list[int], filler: int) -> list[DraftTree]:
    """The trees of a batch's rows in one shape, to verify in one step with one mask: as they
    are when they share it (a template), else each one's spine cut to the shortest of the `live`
    rows' (a batch keeps no more drafts than its row that accepted fewest, so longer chains
    would only cost) and the other rows' padded with `filler` tokens."""
    if all(np.array_equal(tree.parents, trees[0].parents) for tree in trees[1:]):
        return trees
    chains = [tree.spine() for tree in trees]
    width = min(len(chains[row].tokens) for row in live)
    parents = np.arange(-1, width - 1, dtype=np.int64)
    return [DraftTree(np.concatenate([chain.tokens[:width], np.full(max(width - len(chain.tokens), 0), filler,
                                                                     np.int64)]), parents) for chain in chains]


class Drafter:
    """Proposes a DraftTree from the context; told what the model computed on it."""

    name = "base"

    def draft(self, context: list[int]) -> DraftTree:
        raise NotImplementedError

    def update(self, tokens: np.ndarray, logits: np.ndarray) -> None:
        """`tokens` [m]: the tokens a step fed (the root and the tree's nodes, of each row of a batch in
        turn); `logits` [m, vocab] at them."""


class PromptLookup(Drafter):
    """Prompt-lookup decoding: find the last `n`-gram of the context (n from `max_ngram` down
    to 1) earlier in it, most recent occurrence first, and propose the `num_tokens` that
    followed it, as a chain."""

    name = "prompt_lookup"

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3):
        if num_tokens < 1 or max_ngram < 1:
            raise InputError("prompt lookup needs num_tokens >= 1 and max_ngram >= 1")
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def draft(self, context: list[int]) -> DraftTree:
        ids = np.asarray(context, np.int64)
        for n in range(min(self.max_ngram, len(ids) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # occurrences ending before the last token
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                follow = ids[start:start + self.num_tokens]
                return DraftTree(follow.copy(), np.arange(-1, len(follow) - 1, dtype=np.int64))
        return EMPTY


#: limits of a draft tree: every node is fed to each verification step, every level is a gather
MAX_TREE_NODES, MAX_TREE_DEPTH = 512, 32


def _checked_template(template, k: int) -> list[tuple[int, ...]]:
    """A user's template (paths of child ranks from the root), checked and put breadth-first."""
    paths = [tuple(int(r) for r in path) for path in template]
    if any(not path or min(path) < 0 or max(path) >= k for path in paths):
        raise InputError(f"a draft tree template is a list of paths of child ranks in [0, {k}), e.g. [(0,), (1,), (0, 0)]")
    if len(set(paths)) != len(paths):
        raise InputError("a draft tree template lists a path twice; each path is one node")
    if len(paths) > MAX_TREE_NODES or max(map(len, paths), default=0) > MAX_TREE_DEPTH:
        raise InputError(f"a draft tree template may have at most {MAX_TREE_NODES} nodes and depth {MAX_TREE_DEPTH}, "
                         f"got {len(paths)} nodes of depth {max(map(len, paths), default=0)}")
    missing = next((path for path in paths if len(path) > 1 and path[:-1] not in set(paths)), None)
    if missing is not None:
        raise InputError(f"a draft tree template must hold each path's parent: {list(missing)} has no {list(missing[:-1])}")
    return sorted(paths, key=lambda path: (len(path), path))


def tree_template(size: int, k: int = 8, decay: float = 0.5, first: float = 0.6) -> list[tuple[int, ...]]:
    """A static draft tree of `size` nodes, each a path of child ranks (ranks < `k`) from the root,
    breadth-first: the `size` paths most likely to be accepted when the rank-r successor is
    right with probability `first · decay^r`, independently per level (best-first expansion).
    Wide at the top, one long spine of rank-0 successors: the shape of the paper's templates."""
    if not 0 <= size <= MAX_TREE_NODES:
        raise InputError(f"the draft tree size must be in [0, {MAX_TREE_NODES}], got {size}")
    prob = [first * decay ** r for r in range(k)]
    heap = [(-prob[r], (r,)) for r in range(k)]
    chosen: list[tuple[float, tuple[int, ...]]] = []
    while heap and len(chosen) < size:
        value, path = heapq.heappop(heap)
        chosen.append((value, path))
        for r in range(k):
            heapq.heappush(heap, (value * prob[r], path + (r,)))
    return sorted((path for _, path in chosen), key=lambda p: (len(p), p))


class TokenRecycling(Drafter):
    """Token Recycling: `table[token]` holds the top-`k` successors the model last predicted
    after `token` (int32, zeros at first, kept across prompts: "hot start"). A draft fills the
    static `template` level by level (one gather per depth); every fed token's row is then
    replaced by the top-k of the logits at its position, accepted or not. `tree_size` 4 by
    default: on a 2-core CPU a step's cost grows with the tokens fed, and 4 was the fastest
    or within noise of it from 2 to 80 on the decoders benchmarks/decoder_speculation.py
    trains (5 M, 28 M and 57 M parameters); GPUs verify far wider trees at the cost of one
    token (the paper's template has 80 nodes)."""

    name = "token_recycling"

    def __init__(self, vocab_size: int, k: int = 8, tree_size: int = 4, template: list[tuple[int, ...]] | None = None):
        self.k = k
        self.template = _checked_template(template, k) if template is not None else tree_template(tree_size, k)
        index = {path: i for i, path in enumerate(self.template)}
        self.parents = np.array([index[path[:-1]] if len(path) > 1 else -1 for path in self.template], np.int64)
        self.ranks = np.array([path[-1] for path in self.template], np.int64)
        # per depth: (its nodes' slots in [root, nodes], their parents' slots, their ranks)
        self._levels = [(level + 1, self.parents[level] + 1, self.ranks[level]) for level in
                        (np.flatnonzero([len(p) == d for p in self.template])
                         for d in range(1, max(map(len, self.template), default=0) + 1))]
        self.table = np.zeros((vocab_size, k), np.int32)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def draft(self, context: list[int]) -> DraftTree:
        fed = np.empty(len(self.template) + 1, np.int64)  # the root, then the nodes
        fed[0] = context[-1]
        flat = self.table.reshape(-1)
        for slots, parents, ranks in self._levels:  # one gather per depth
            fed[slots] = flat[fed[parents] * self.k + ranks]
        return DraftTree(fed[1:], self.parents)

    def update(self, tokens: np.ndarray, logits: np.ndarray) -> None:
        if len(tokens):
            self.table[tokens] = _top_k(self.k)(logits)

    def save(self, path: str | Path) -> None:
        """Write the table (a .npy file): `load` it next time to start hot."""
        np.save(path, self.table)

    def load(self, path: str | Path) -> None:
        table = np.load(path)
        if table.shape != self.table.shape or table.dtype.kind not in "iu":
            raise InputError(f"{path}: a token recycling table of this build is an integer array "
                             f"{list(self.table.shape)}, got {table.dtype}{list(table.shape)}")
        if table.size and (table.min() < 0 or table.max() >= len(self.table)):
            raise InputError(f"{path}: the table holds token ids outside this build's vocabulary of {len(self.table)}")
        self.table = table.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _top_k(k: int):
    """logits [rows, vocab] -> int32 [rows, k]: each row's k best token ids, best first (ties:
    the lower id). ONNX Runtime's TopK on one thread: it runs at every step, and is several
    times faster than NumPy's argpartition + argsort over a vocabulary."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("TopK", ["logits", "k"], ["values", "ids"], largest=1, sorted=1)], "top_k",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", "vocab"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", k])],
        [helper.make_tensor("k", TensorProto.INT64, [1], [k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda logits: session.run(["ids"], {"logits": np.asarray(logits, np.float32)})[0].astype(np.int32)


def make_drafter(speculation, vocab_size: int) -> Drafter | None:
    """The drafter `generator(speculation=...)` names (a name, a Drafter, or None)."""
    if speculation is None or isinstance(speculation, Drafter):
        return speculation
    if speculation == "prompt_lookup":
        return PromptLookup()
    if speculation == "token_recycling":
        return TokenRecycling(vocab_size)
    raise InputError(f"unknown speculation {speculation!r}; choose one of {list(SPECULATIONS)} or None")
