"""bench's timing harness: warm-up, alternating order, one sample per round per model."""

from __future__ import annotations

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
