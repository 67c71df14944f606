"""model.py of a Triton python-backend model written by `trimrt export-triton`.

It runs the build in its version folder (1/build) with trimrt's runtime, so the server's
Python environment needs trimrt (`pip install trimrt`, or an EXECUTION_ENV_PATH that has
it). Parameters of config.pbtxt: `mode` ("run": the build's inputs and outputs, requests
batched by `trimrt.serving.batching`, the same answers as `Session.run`; "generate": a
decoder build, a prompt in and its greedy or sampled continuation out; "tokenize": the
first step of a text ensemble, texts in, an encoder's token inputs out, with the
tokenizer.json of its version folder), `intra_op_threads` (ONNX Runtime threads per
instance; default: its own choice) and `max_tokens` (tokenize: truncation).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

#: optional generation inputs -> (Generator option, Python type)
GENERATION_OPTIONS = {"max_tokens": ("max_new_tokens", int), "temperature": ("temperature", float),
                      "top_p": ("top_p", float), "seed": ("seed", int)}


class TritonPythonModel:
    def initialize(self, args):
        from trimrt.runtime import load
        from trimrt.serving.batching import BatchPolicy

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        version = Path(args["model_repository"]) / str(args["model_version"])
        self.mode = params.get("mode", "run")
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.session = None
        if self.mode == "tokenize":
            self.tokenizer = _tokenizer(version / "tokenizer.json", int(params.get("max_tokens") or 0))
            self.dtypes = {o["name"]: np.int32 if o["data_type"] == "TYPE_INT32" else np.int64 for o in config["output"]}
            return
        threads = int(params["intra_op_threads"]) if params.get("intra_op_threads") else None
        self.session = load(version / "build", threads=threads, spinning=False)  # cores shared with the server
        if self.mode == "generate":
            self.generator = self.session.generator()
        else:
            self.policy = BatchPolicy.of_session(self.session)

    def execute(self, requests):
        if self.mode == "generate":
            return [self._generate(r) for r in requests]
        if self.mode == "tokenize":
            return [self._tokenize(r) for r in requests]
        from trimrt.serving.batching import run_requests

        feeds = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs}
            feeds.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})
        return [_response(result, self.outputs) for result in run_requests(self.session, feeds, self.policy, self.outputs)]

    def _generate(self, request):
        from trimrt.errors import TrimrtError

        try:
            prompt = _text(pb_utils.get_input_tensor_by_name(request, "prompt"))
            options = {}
            for name, (option, kind) in GENERATION_OPTIONS.items():
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    options[option] = kind(tensor.as_numpy().reshape(-1)[0])
            if self.generator.tokenizer is None:  # no tokenizer: the prompt is token ids "1,2,3"
                prompt = [int(t) for t in prompt.replace(" ", "").split(",") if t]
            result = self.generator.generate(prompt, **options)
        except (TrimrtError, ValueError) as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{exc}"))
        text = result.text if result.text is not None else " ".join(map(str, result.tokens))
        return pb_utils.InferenceResponse([pb_utils.Tensor("text", np.array([text.encode()], dtype=np.object_)),
                                           pb_utils.Tensor("tokens", np.array(result.tokens, dtype=np.int64))])

    def _tokenize(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "text")
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in tensor.as_numpy().reshape(-1)]
        if not texts:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("the request has no text"))
        encodings = self.tokenizer.encode_batch(texts)
        columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                   "token_type_ids": [e.type_ids for e in encodings]}
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.array(columns[name], dtype=self.dtypes[name]))
                                           for name in self.outputs])

    def finalize(self):
        if self.session is not None:
            self.session.close()


def _tokenizer(path, max_tokens: int):
    """A tokenizers.Tokenizer padding a batch to its longest text and truncating to `max_tokens`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.padding is None:
        pad = next((t for t in ("[PAD]", "<pad>", "<|pad|>") if tokenizer.token_to_id(t) is not None), None)
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad) if pad else 0, pad_token=pad or "[PAD]")
    else:
        tokenizer.enable_padding(**{k: v for k, v in tokenizer.padding.items() if k in ("pad_id", "pad_token",
                                                                                         "pad_type_id", "direction")})
    if max_tokens:
        tokenizer.enable_truncation(max_tokens)
    return tokenizer


def _text(tensor) -> str:
    if tensor is None:
        raise ValueError("the request has no 'prompt'")
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _response(result, names):
    if isinstance(result, Exception):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result)))
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(result[name])) for name in names])
