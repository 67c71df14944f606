"""`trimrt tune`: the fastest build that meets a fidelity budget on the user's own data.

- `space`: the candidate recipes that apply to a model (encoders: token pruning, merging,
  MoD routing, sparse attention for long samples, INT8 methods and their combinations;
  decoders: weight formats and methods; each with ONNX Runtime fusion);
- `evaluation`: the evaluation samples, the original's outputs and the metric (cosine, top1,
  retrieval, perplexity) a candidate is scored on;
- `search`: compile every candidate, keep those that meet the budget on the evaluation
  data, then spend the time budget on speed by successive halving (short alternating
  timings for all, longer ones for the fastest); state is saved after every measurement,
  so an interrupted run resumes;
- `report`: the Pareto front (speed vs fidelity) as a matplotlib picture and a markdown table.
"""

from .search import TuneProgress, TuneResult, tune

__all__ = ["TuneProgress", "TuneResult", "tune"]
