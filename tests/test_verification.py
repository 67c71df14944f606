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
