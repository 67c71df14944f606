"""Dynamic batching that never changes an answer.

A server collects the requests that arrive within a few milliseconds and runs them as one
batch. trimrt serves what `Session.run` returns for each request alone, so a batch is only
formed where the other rows cannot change a row's answer (what remains is float rounding:
ONNX Runtime's kernels split a larger batch differently, about 1e-7 on MiniLM; a request run
alone, as with max_batch 1, is bit-identical):

- requests are grouped by their inputs' dtypes and non-batch shapes (text of one token
  length with text of the same length), concatenated on axis 0, run once, and split again;
  nothing is padded (padding changes what pooling and token pruning see);
- a build whose rows interact is run one request at a time: ONNX Runtime's dynamic INT8
  (`DynamicQuantizeLinear`) quantizes an activation with one scale over the whole batch,
  so a row's answer would depend on its neighbours;
- each request is validated alone first, so a bad request gets its own error and never
  fails the others; if a group's run fails on values (an id out of the vocabulary), its
  requests are run one by one to give each its own answer or error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError, TrimrtError
from ..runtime.feeds import TensorInfo, validate_feeds

#: ops whose result for one row depends on the other rows of the batch (one quantization
#: scale per tensor, computed at run time over all of its rows)
ROW_COUPLING_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention"})


def row_coupling_ops(model) -> list[str]:
    """The ops of `model` (an ONNX file's path, or a loaded ModelProto; graph and functions)
    that make a row's output depend on the other rows of its batch; empty when the rows of a
    batch are independent."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    found = {n.op_type for n in model.graph.node if n.op_type in ROW_COUPLING_OPS}
    for function in model.functions:
        found |= {n.op_type for n in function.node if n.op_type in ROW_COUPLING_OPS}
    return sorted(found)


def batch_axis_dynamic(infos: Sequence[TensorInfo]) -> bool:
    """Every tensor has a leading axis whose size is free (the batch axis)."""
    return all(i.shape and not isinstance(i.shape[0], int) for i in infos)


@dataclass(frozen=True)
class BatchPolicy:
    """Whether requests may share a run, and why not when they may not."""

    rows_independent: bool
    reason: str = ""

    @classmethod
    def of_session(cls, session) -> "BatchPolicy":
        if not batch_axis_dynamic(session.inputs) or not batch_axis_dynamic(session.outputs):
            return cls(False, "the build's batch axis is fixed")
        coupled = row_coupling_ops(session.build_dir / "model.onnx")
        if coupled:
            return cls(False, f"its {', '.join(coupled)} quantizes each activation with one scale over the whole "
                              "batch, so batching would change answers")
        return cls(True)


def _group_key(feeds: Mapping[str, np.ndarray]) -> tuple:
    return tuple(sorted((name, arr.dtype.str, arr.shape[1:]) for name, arr in feeds.items()))


def run_requests(session, requests: Sequence[Mapping[str, object]], policy: BatchPolicy,
                 output_names: list[str] | None = None) -> list[dict[str, np.ndarray] | TrimrtError]:
    """Run each request's feeds through `session` (batched where `policy` allows); returns,
    in the requests' order, each one's outputs or the TrimrtError it alone caused."""
    results: list[dict[str, np.ndarray] | TrimrtError | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    checked: dict[int, dict[str, np.ndarray]] = {}
    for i, feeds in enumerate(requests):
        try:
            if not isinstance(feeds, Mapping):
                raise InputError(f"a request's inputs must be a mapping {{input name: array}}, got a {type(feeds).__name__}")
            checked[i] = validate_feeds(session.inputs, feeds)
        except TrimrtError as exc:
            results[i] = exc
            continue
        key = _group_key(checked[i]) if policy.rows_independent else (i,)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        for i, result in zip(members, _run_group(session, [checked[i] for i in members], output_names)):
            results[i] = result
    return results  # type: ignore[return-value]


def _run_group(session, group: list[dict[str, np.ndarray]], output_names) -> list[dict[str, np.ndarray] | TrimrtError]:
    """One run of the group's rows concatenated, split back per request; each request alone
    when the run fails on one's values (an id out of range) or an output lacks the batch axis."""
    if len(group) > 1:
        bounds = np.cumsum([0, *(len(next(iter(feeds.values()))) for feeds in group)])
        try:
            out = session.run({name: np.concatenate([f[name] for f in group]) for name in group[0]}, output_names)
        except TrimrtError:
            out = None
        if out is not None and all(arr.ndim and arr.shape[0] == bounds[-1] for arr in out.values()):
            return [{name: arr[bounds[k]:bounds[k + 1]] for name, arr in out.items()} for k in range(len(group))]
    return [_run_one(session, feeds, output_names) for feeds in group]


def _run_one(session, feeds, output_names) -> dict[str, np.ndarray] | TrimrtError:
    try:
        return session.run(feeds, output_names)
    except TrimrtError as exc:
        return exc
