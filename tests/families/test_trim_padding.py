"""[padding] trim_trailing: exact on real tokens, interface unchanged, clear error without a mask."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.hf_models import exported, make  # noqa: E402
from trimrt.errors import StructureError  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return exported("bert")[0]


@pytest.mark.parametrize("pruning", [None, {"layers": [1], "keep": 1.0, "fuse_pruned": True}])
def test_trimming_is_exact_on_real_tokens(bert, tmp_path, pruning):
    recipe = {"padding": {"trim_trailing": True}}
    if pruning:
        recipe["token_pruning"] = pruning
    manifest = trimrt.compile(str(bert), recipe, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "trim_padding")
    assert report["inputs_trimmed"] == ["input_ids", "attention_mask"] and report["outputs_padded"] == ["last_hidden_state"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, (3, 40))
    mask = np.ones((3, 40), np.int64)
    mask[0, 10:], mask[1, 25:], mask[2, 30:] = 0, 0, 0  # longest real length 30 of 40
    feeds = {"input_ids": ids, "attention_mask": mask}
    got = trimrt.load(tmp_path / "b").run(feeds)
    want = dict(zip(["last_hidden_state", "pooler_output"], ort.InferenceSession(str(bert)).run(None, feeds)))
    assert got["last_hidden_state"].shape == (3, 40, 64)  # padded back: same interface
    real = mask.astype(bool)
    np.testing.assert_allclose(got["last_hidden_state"][real], want["last_hidden_state"][real], atol=1e-5)
    np.testing.assert_allclose(got["pooler_output"], want["pooler_output"], atol=1e-5)
    assert np.all(got["last_hidden_state"][:, 30:] == 0)  # beyond the longest sentence: padding, zeros


def test_trimming_needs_a_mask_input(tiny_vit_onnx, tmp_path):
    _, path = tiny_vit_onnx
    with pytest.raises(StructureError, match=r"trim_padding needs a dynamic-length attention mask input"):
        trimrt.compile(str(path), {"padding": {"trim_trailing": True}}, tmp_path / "b")


def test_padding_is_never_kept_while_real_tokens_are_dropped(bert, tmp_path):
    """Padded keys get zero attention, so the CLS score ranks every real token above every
    padding token: a sample keeps padding only once all its real tokens are kept."""
    import onnx

    trimrt.compile(str(bert), {"token_pruning": {"layers": [0], "keep": 0.5}}, tmp_path / "b")
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    prune = next(n for n in model.graph.node if n.op_type == "TokenPrune")
    model.graph.output.append(onnx.helper.make_tensor_value_info(prune.output[1], onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mask = np.ones((3, 40), np.int64)
    mask[0, 8:], mask[1, 30:] = 0, 0  # 8 real tokens (fewer than kept: padding must fill), 30 real
    ids = np.random.default_rng(1).integers(0, 200, (3, 40))
    kept = session.run([prune.output[1]], {"input_ids": ids, "attention_mask": mask})[0]
    assert kept.shape == (3, 1 + 20)  # CLS + ceil(0.5 · 39)
    for sample, row in enumerate(kept):
        real = int(mask[sample].sum())
        kept_padding = row[row >= real]
        if kept_padding.size:  # only when every real token is kept
            assert set(range(real)) <= set(row.tolist()), f"sample {sample} keeps padding but drops real tokens"
        else:
            assert np.all(row < real)
    assert np.array_equal(kept[0][:8], np.arange(8))  # all 8 real tokens kept, then padding


def test_static_export_is_refused_naming_the_fixed_length(tmp_path):
    """An export with a static token count has no padding to trim at run time: one line
    saying so, not a graph that slices a fixed-length model."""
    from tests.families.hf_models import export

    module, inputs = make("bert", layers=2)
    export(module, inputs, "torchscript", True, tmp_path / "bert.onnx")
    with pytest.raises(StructureError, match=r"fixes 'attention_mask' at 24 tokens"):
        trimrt.compile(str(tmp_path / "bert.onnx"), {"padding": {"trim_trailing": True}}, tmp_path / "b")
    assert not (tmp_path / "b").exists()
