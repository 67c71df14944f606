"""What `trimrt tune` scores candidates on: the evaluation samples, the original model's
outputs on them, and the metric (cosine, top1, retrieval, perplexity), plus the FLOPs ratio
counted on an evaluation sample."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import TrimrtError, TuneError

log = logging.getLogger(__name__)

METRICS = ("cosine", "top1", "retrieval", "perplexity")
#: the budget of a metric when none is given (cosine's is `min_cosine`; perplexity's, the
#: original's perplexity over the build's: 1 / (1 + the largest increase allowed, 2%))
DEFAULT_MIN = {"top1": 0.97, "retrieval": 0.95, "perplexity": 1 / 1.02}
#: neighbours the retrieval metric compares (recall@k)
RETRIEVAL_K = 5


class Evaluation:
    """The evaluation samples, the original model's outputs on them, and the metric."""

    def __init__(self, source: Path, eval_data: Path, samples: int, tokenizer, max_length, metric: str | None):
        """`metric` None: perplexity for a KV-cache decoder, cosine for other models."""
        import onnx

        from ..quantization.calibration import load_calibration_feeds, model_inputs
        from ..recipe import CalibrationOptions
        from ..runtime.backends import OnnxRuntimeBackend
        from ..runtime.kv_cache import past_layers

        inputs = model_inputs(onnx.load(str(source), load_external_data=False))
        self.source, self._source_flops = source, None
        #: a KV-cache decoder: scored on its logits at every position of the prefill
        self.decoder = bool(past_layers([i.name for i in inputs]))
        self.metric = metric = metric or ("perplexity" if self.decoder else "cosine")
        if metric == "perplexity" and not self.decoder:
            raise TuneError("metric perplexity needs a KV-cache decoder (the model is an encoder); use cosine, top1 or "
                            "retrieval")
        if metric == "retrieval" and self.decoder:
            raise TuneError("metric retrieval compares embeddings (the model is a decoder); use perplexity, cosine or "
                            "top1")
        try:
            options = CalibrationOptions(source=str(eval_data.resolve()), samples=samples, tokenizer=tokenizer,
                                         max_length=max_length)
            self.feeds = load_calibration_feeds(options, inputs, None)
        except TrimrtError as exc:
            raise TuneError(f"the evaluation data {eval_data}: {exc}") from None
        backend = OnnxRuntimeBackend(source, threads=2, spinning=False)
        backend.activate()
        began = time.monotonic()
        self.reference = [backend.infer(f, None) for f in self.feeds]
        #: the original model's seconds per sample (the search's time estimate)
        self.seconds_per_sample = (time.monotonic() - began) / max(len(self.feeds), 1)
        backend.deactivate()
        #: the tokens of the longest evaluation sample (None: no token input)
        self.tokens = max((v.shape[1] for f in self.feeds for n, v in f.items()
                           if n in ("input_ids", "inputs_embeds") and v.ndim >= 2), default=None)
        rows = sum(next(iter(r.values())).shape[0] for r in self.reference)
        if metric == "retrieval" and rows < 3:
            raise TuneError(f"metric retrieval ranks each evaluation sample's neighbours: {eval_data} gave {rows} "
                            "sample(s), give 3 or more")

    def flops_ratio(self, model_path: Path) -> float | None:
        """The original's FLOPs over the build's on the first evaluation sample (the build's
        manifest counts them at the export's example, which may be far shorter than the
        user's data); None when they cannot be counted."""
        import onnx

        from ..compiler.flops import count_flops

        try:
            if self._source_flops is None:
                self._source_flops = count_flops(onnx.load(str(self.source)), self.feeds[0])
            built = count_flops(onnx.load(str(model_path)), self.feeds[0])
        except Exception as exc:  # noqa: BLE001 - a proxy for the report: the manifest's count stands in
            log.info("FLOPs not counted on the evaluation sample (%s)", str(exc).splitlines()[0][:200])
            return None
        return round(self._source_flops / built, 4) if built else None

    def score(self, session) -> float:
        """The build's fidelity to the original model on the evaluation samples."""
        from ..compare import compare_outputs, retrieval_agreement

        got = [session.run(f) for f in self.feeds]
        if self.decoder:
            return self._score_logits([g["logits"] for g in got])
        names = [n for n in self.reference[0] if n in got[0] and got[0][n].shape == self.reference[0][n].shape]
        if not names:
            raise TuneError("no output of the build has the original's shape (token-level outputs of a pruned model); "
                            "tune needs a pooled output (an embedding, logits)")
        values = []
        for name in names:
            got_all = np.concatenate([g[name] for g in got])
            ref_all = np.concatenate([r[name] for r in self.reference])
            if self.metric == "retrieval":
                if ref_all.ndim == 2 and np.issubdtype(ref_all.dtype, np.floating):
                    values.append(retrieval_agreement(ref_all, ref_all, got_all, got_all, RETRIEVAL_K,
                                                      leave_one_out=True)[1])
                continue
            m = compare_outputs(name, got_all, ref_all)
            if self.metric == "top1":
                if m.top1 is not None:
                    values.append(m.top1)
            else:
                values.append(m.cosine_mean)
        if not values:
            raise TuneError(f"metric {self.metric} needs " + (
                "a logits output ([batch, classes])" if self.metric == "top1" else
                "an embedding output ([batch, dim])") + "; use --metric cosine")
        return float(min(values))

    def _score_logits(self, got: list[np.ndarray]) -> float:
        """A decoder's fidelity from its prefill logits [1, tokens, vocab] per sample, the
        positions that are padding left out."""
        from ..compare import next_token_nll, sample_cosines

        if self.metric == "perplexity":
            nll_ref = nll_got = 0.0
            counted = 0
            for feed, ref, logits in zip(self.feeds, self.reference, got):
                tokens, mask = feed["input_ids"], feed.get("attention_mask")
                nll_ref += next_token_nll(ref["logits"], tokens, mask)[0]
                nll, count = next_token_nll(logits, tokens, mask)
                nll_got, counted = nll_got + nll, counted + count
            return float(np.exp((nll_ref - nll_got) / max(counted, 1)))
        per_position = []
        for feed, ref, logits in zip(self.feeds, self.reference, got):
            real = (feed.get("attention_mask", np.ones(logits.shape[:2])) != 0).ravel()
            a, b = (x.reshape(-1, x.shape[-1])[real] for x in (logits, ref["logits"]))
            per_position.append(a.argmax(-1) == b.argmax(-1) if self.metric == "top1" else sample_cosines(a, b))
        return float(np.mean(np.concatenate(per_position)))
