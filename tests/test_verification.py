"""verify's per-output metrics."""

from __future__ import annotations

import numpy as np
import pytest

from trimrt.errors import InputError
from trimrt.verification import compare_outputs


def test_metrics_against_hand_computed_values():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]], np.float32)
    got = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 2.0]], np.float32)
    m = compare_outputs("logits", got, ref)
    assert m.max_abs == pytest.approx(1.0)
    cos1 = 1.0 / np.sqrt(1.01)
    cos2 = (2.0 + 2.0) / 5.0
    assert m.cosine_mean == pytest.approx((cos1 + cos2) / 2, rel=1e-6)
    assert m.cosine_min == pytest.approx(cos2, rel=1e-6)
    assert m.top1 == 0.5  # sample 2's argmax moved from class 1 to class 2


def test_top1_only_for_logits_and_shapes_must_match():
    emb = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert compare_outputs("sentence_embedding", emb, emb).top1 is None
    assert compare_outputs("sentence_embedding", emb, emb).cosine_min == pytest.approx(1.0)
    with pytest.raises(InputError, match="differs from the reference"):
        compare_outputs("x", emb[:, :4], emb)


def test_per_pass_drift_attribution(tmp_path):
    """Pruning + INT8: verify applies the tables one at a time; pruning alone drifts less
    than pruning + INT8, whose cosine is the build's own."""
    import trimrt

    build = tmp_path / "b"
    trimrt.compile("examples.models.vit:tiny_vit", {"token_pruning": {"layers": [1], "keep": 0.5},
                                                  "quantization": {}}, build)
    report = trimrt.verify(build, samples=3, per_pass=True)
    assert [s["passes"] for s in report.per_pass] == [["token_pruning"], ["token_pruning", "quantization"]]
    pruned, both = (s["cosine_mean"]["logits"] for s in report.per_pass)
    assert both == pytest.approx(report.outputs[0].cosine_mean, abs=1e-6)
    assert 0.9 < both < 1.0 and 0.9 < pruned < 1.0


def test_per_pass_needs_the_original_onnx(tmp_path, tiny_vit_onnx):
    import shutil

    import trimrt
    from trimrt.errors import InputError

    _, path = tiny_vit_onnx
    build = tmp_path / "b"
    trimrt.compile(str(path), {"quantization": {}}, build)
    with pytest.raises(InputError, match="per-pass drift needs the original ONNX"):
        trimrt.verify(build, "examples.models.vit:tiny_vit", samples=1, per_pass=True)
    copy = tmp_path / "original.onnx"
    shutil.copy(path, copy)
    assert len(trimrt.verify(build, str(copy), samples=1, per_pass=True).per_pass) == 1


def test_retrieval_agreement_compares_the_nearest_neighbours():
    from trimrt.compare import retrieval_agreement

    # 4 items on a circle: each one's nearest neighbours are its two sides, then the opposite
    angles = np.array([0.0, 0.5, 1.6, 3.0])
    ref = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # the build moves item 3 next to item 0: items 0's and 2's nearest change, 1's does not
    got = ref.copy()
    got[3] = [np.cos(-0.2), np.sin(-0.2)]
    top1, recall = retrieval_agreement(ref, ref, got, got, k=1, leave_one_out=True)
    # nearest by the original: 0→1, 1→0, 2→1, 3→2; by the build: 0→3, 1→0, 2→1, 3→0
    assert (top1, recall) == (0.5, 0.5)
    top1, recall2 = retrieval_agreement(ref, ref, got, got, k=2, leave_one_out=True)
    # 2 nearest, original: {1,2}, {0,2}, {1,3}, {2,1}; build: {3,1}, {0,3}, {1,0}, {0,1}
    assert recall2 == np.mean([1 / 2, 1 / 2, 1 / 2, 1 / 2])
    assert retrieval_agreement(ref, ref, ref, ref, k=3, leave_one_out=True) == (1.0, 1.0)
    # k larger than the corpus is cut to it; a one-item corpus cannot rank anything
    assert retrieval_agreement(ref[:2], ref, got[:2], got, k=10) == (1.0, 1.0)
    with pytest.raises(InputError, match="at least 2"):
        retrieval_agreement(ref[:1], ref[:1], got[:1], got[:1], leave_one_out=True)
