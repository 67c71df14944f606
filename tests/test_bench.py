"""bench's timing harness: warm-up, alternating order, one sample per round per model."""

from __future__ import annotations

import pytest

from trimrt.bench import BenchReport, time_alternating


def test_alternates_and_counts():
    calls = []
    a, b = (lambda: calls.append("a")), (lambda: calls.append("b"))
    ta, tb = time_alternating(a, b, warmup=2, rounds=4)
    assert len(ta) == len(tb) == 4 and all(t >= 0 for t in ta + tb)
    assert calls[:4] == ["a", "b", "a", "b"]  # warm-up
    assert calls[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # ABBA: neither side always runs first


def test_efficiency_is_measured_over_ideal():
    r = BenchReport(batch=1, threads=2, rounds=3, baseline_ms=10.0, build_ms=8.0, speedup=1.25, flops_ratio=1.5)
    assert abs(r.efficiency - 1.25 / 1.5) < 1e-12
    assert BenchReport(1, 2, 3, 1.0, 1.0, 1.0, None).efficiency is None


def test_paired_speedup_is_the_median_of_round_ratios():
    from trimrt.bench import paired_speedup

    # a slow spell in rounds 3-4 hits both models: per-round ratios stay 2
    base = [10.0, 10.0, 30.0, 30.0, 10.0]
    build = [5.0, 5.0, 15.0, 15.0, 5.0]
    assert paired_speedup(base, build) == 2.0
    assert paired_speedup([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 2.0


def test_bench_refuses_a_batch_the_model_cannot_take(tmp_path, tiny_vit_onnx):
    """A model exported with its batch axis fixed: batch 8 is an InputError, not a silent
    measurement at the fixed batch."""
    import onnx

    import trimrt
    from trimrt.bench import bench_build
    from trimrt.errors import InputError

    _, path = tiny_vit_onnx
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # fix the batch axis
    fixed = tmp_path / "fixed_batch.onnx"
    onnx.save(model, str(fixed))
    build = tmp_path / "build"
    trimrt.compile(str(fixed), {"token_pruning": {"layers": [1], "keep": 0.5}}, build)
    with pytest.raises(InputError, match="batch axis is fixed at 2"):
        bench_build(build, fixed, batch=8, rounds=1, warmup=0)
    assert bench_build(build, fixed, batch=2, rounds=1, warmup=0).batch == 2
