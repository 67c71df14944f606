"""Bad builds and bad feeds, one table: every way a user (or a tampered folder) can hand the
runtime something wrong must end in a typed trimrt error with a one-line message, never a
raw ONNX Runtime / Python exception, and `load()` must never read a file outside the build.

Every row uses one tiny pruned BERT build (TorchScript export, a few seconds), compiled once
per module; rows that break the build work on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import trimrt
from trimrt.errors import BuildLoadError, InputError, RunError, SessionClosedError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB, POSITIONS = 200, 64  # the tiny BERT's vocabulary and position table
N = 12  # tokens of the example inputs


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A tiny BERT with token pruning in block 1 (so its manifest records min_tokens too)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    module = transformers.BertModel(config).eval()
    ids = torch.randint(2, VOCAB, (2, N))
    out = tmp_path_factory.mktemp("bad") / "build"
    recipe = {"token_pruning": {"method": "cls_attention", "layers": [1], "keep": 0.5, "protect": "cls"}}
    trimrt.compile(module, recipe, out, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                   exporter="torchscript")
    return out


def _feeds(ids=None, *, batch=1, tokens=N):
    ids = np.full((batch, tokens), 5, np.int64) if ids is None else np.asarray(ids, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- how to break a build (each edits a copy in place) ----

def _edit_manifest(edit):
    def apply(path: Path) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest = edit(manifest, path)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return apply


def _list_outside_file(name_of):
    """List a file that lies outside the build (with its correct hash, so only the path is wrong)."""
    def edit(manifest, path):
        outside = path.parent / "outside.txt"
        outside.write_text("not part of the build")
        manifest["files"][name_of(path)] = _sha(outside.read_bytes())
        return manifest
    return _edit_manifest(edit)


def _symlink_model_outside(path: Path) -> None:
    """model.onnx becomes a link to an identical copy outside the build (hash still matches)."""
    outside = path.parent / "outside.onnx"
    shutil.copy(path / "model.onnx", outside)
    (path / "model.onnx").unlink()
    os.symlink(outside, path / "model.onnx")


def _unlist_and_modify_model(path: Path) -> None:
    _edit_manifest(lambda m, p: {**m, "files": {k: v for k, v in m["files"].items() if k != "model.onnx"}})(path)
    with open(path / "model.onnx", "ab") as f:
        f.write(b"\x00")


def _unlisted_engine(path: Path) -> None:
    (path / "model.engine").write_bytes(b"an engine nobody listed")


def _corrupt_model_with_matching_hash(path: Path) -> None:
    garbage = b"this is not an ONNX model" * 10
    (path / "model.onnx").write_bytes(garbage)
    _edit_manifest(lambda m, p: {**m, "files": {**m["files"], "model.onnx": _sha(garbage)}})(path)


def _model_failing_mid_run(path: Path) -> None:
    """A (hash-consistent) model that takes the same inputs but fails inside ONNX Runtime on
    feeds that pass every check: a Reshape into rows of 5 values, given 12 tokens."""
    from onnx import TensorProto, helper, numpy_helper

    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "attention_mask"], ["sum"]),
         helper.make_node("Reshape", ["sum", "rows"], ["last_hidden_state"], name="into_rows_of_5")],
        "fails", ids, [helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, [None, 5])],
        [numpy_helper.from_array(np.array([-1, 5], np.int64), "rows")])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    (path / "model.onnx").write_bytes(data)
    _edit_manifest(lambda m, p: {**m, "files": {**m["files"], "model.onnx": _sha(data)}})(path)


def _forget_input_limits(path: Path) -> None:
    """A build written before the manifest recorded input limits: ONNX Runtime's own error must be wrapped."""
    _edit_manifest(lambda m, p: {k: v for k, v in m.items() if k != "input_limits"})(path)


def _set(key, value):
    return _edit_manifest(lambda m, p: {**m, key: value})


# ---- what to do with the (possibly broken) build ----

def _load(path):
    trimrt.load(path)


def _run(feeds, output_names=None):
    def action(path):
        trimrt.load(path).run(feeds, output_names)
    return action


def _run_after_close(path):
    session = trimrt.load(path)
    session.close()
    session.run(_feeds())


def _run_after_with(path):
    with trimrt.load(path) as session:
        session.run(_feeds())
    session.run(_feeds())


CASES = [
    # id, how to break the build (None: as compiled), what to do, expected exception, words in the message
    ("files-parent-dir", _list_outside_file(lambda p: "../outside.txt"), _load, BuildLoadError, "outside the build"),
    ("files-absolute-path", _list_outside_file(lambda p: str(p.parent / "outside.txt")), _load, BuildLoadError,
     "outside the build"),
    ("files-etc-hostname", _edit_manifest(lambda m, p: {**m, "files": {**m["files"], "/etc/hostname": "0" * 64}}),
     _load, BuildLoadError, "outside the build"),
    ("model-symlink-outside", _symlink_model_outside, _load, BuildLoadError, "outside the build"),
    ("manifest-symlink-outside", lambda p: (shutil.move(p / "manifest.json", p.parent / "m.json"),
                                            os.symlink(p.parent / "m.json", p / "manifest.json")),
     _load, BuildLoadError, "outside the build"),
    ("model-not-listed", _unlist_and_modify_model, _load, BuildLoadError, "model.onnx is not listed"),
    ("a-model-file-not-a-build", None, lambda p: trimrt.load(p / "model.onnx"), BuildLoadError,
     "is a file, not a build directory"),
    ("engine-not-listed", _unlisted_engine, _load, BuildLoadError, "model.engine is not listed"),
    ("reference-outside", _set("reference", "../outside.onnx"), _load, BuildLoadError,
     "'../outside.onnx' lies outside the build"),
    ("manifest-is-a-list", lambda p: (p / "manifest.json").write_text("[1, 2]"), _load, BuildLoadError,
     "not a JSON object"),
    ("files-is-a-list", _set("files", ["model.onnx"]), _load, BuildLoadError, "'files' must be an object"),
    ("digest-not-hex", _edit_manifest(lambda m, p: {**m, "files": {**m["files"], "model.onnx": 12}}), _load,
     BuildLoadError, "not a sha256"),
    ("digest-wrong-length", _edit_manifest(lambda m, p: {**m, "files": {**m["files"], "model.onnx": "abc"}}), _load,
     BuildLoadError, "not a sha256"),
    ("corrupt-model-matching-hash", _corrupt_model_with_matching_hash, _load, BuildLoadError,
     "ONNX Runtime cannot load model.onnx"),
    ("onnxruntime-settings-not-object", _set("onnxruntime", "fast"), _load, BuildLoadError, "'onnxruntime'"),
    ("min-tokens-not-int", _set("min_tokens", "two"), _load, BuildLoadError, "'min_tokens'"),
    ("input-limits-malformed", _set("input_limits", {"ids": {"input_ids": {"limit": "many"}}}), _load,
     BuildLoadError, "'input_limits'"),
    # feeds and calls
    ("feeds-not-a-mapping", None, _run([np.zeros((1, N), np.int64)]), InputError, "mapping"),
    ("ragged-feed", None, _run({"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]]}), InputError,
     "input 'input_ids'"),
    ("unknown-output", None, _run(_feeds(), ["pooled", "nope"]), InputError, "unknown output"),
    ("output-names-a-string", None, _run(_feeds(), "last_hidden_state"), InputError, "list of output names"),
    ("token-id-too-large", None, _run(_feeds([[5] * (N - 1) + [VOCAB]])), InputError,
     f"token id {VOCAB} at [0, {N - 1}] is outside the vocabulary of {VOCAB}"),
    ("token-id-negative", None, _run(_feeds([[-1] + [5] * (N - 1)])), InputError, "token id -1 at [0, 0]"),
    ("too-many-tokens", None, _run(_feeds(tokens=POSITIONS + 1)), InputError,
     f"{POSITIONS + 1} tokens; this model has {POSITIONS} positions"),
    ("batch-0-pruned", None, _run(_feeds(batch=0)), InputError, "axis 0 of input 'input_ids' is empty"),
    ("run-after-close", None, _run_after_close, SessionClosedError, "closed"),
    ("run-after-with", None, _run_after_with, SessionClosedError, "closed"),
    ("ort-failure-is-a-run-error", _model_failing_mid_run, _run(_feeds()), RunError,
     "Reshape node 'into_rows_of_5' failed"),
    ("ort-error-is-wrapped", _forget_input_limits, _run(_feeds([[VOCAB + 7] * N])), InputError,
     "Gather node '/module/embeddings/word_embeddings/Gather'"),
]


@pytest.mark.parametrize("break_build,action,error,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_typed_one_line_error(build, tmp_path, break_build, action, error, words):
    path = build
    if break_build is not None:
        path = tmp_path / "build"
        shutil.copytree(build, path, symlinks=True)
        break_build(path)
    with pytest.raises(error) as info:
        action(path)
    message = str(info.value)
    assert words in message and "\n" not in message, message
    assert type(info.value).__module__ == "trimrt.errors"


def test_the_build_itself_loads_and_runs(build):
    """The table's base build is fine: the errors above come from the breakage alone."""
    with trimrt.load(build) as session:
        out = session.run(_feeds(batch=2), ["last_hidden_state"])
    assert list(out) == ["last_hidden_state"] and out["last_hidden_state"].shape[0] == 2
