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
