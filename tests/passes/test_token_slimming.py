"""TokenSlimmingPass: SiT Token Slimming Modules, as both torch exporters emit them,
become one trimrt::TokenSlim each; the decomposed build equals the original on ORT."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from examples.models.sit import TokenSlimming, tiny_sit
from examples.models.vit import tiny_vit
from trimrt.compiler.pipeline import AttachDecompositionsPass
from trimrt.compiler.source import export_torch
from trimrt.passes import PASS_TAG
from trimrt.passes.token_slimming import TokenSlimmingPass
from trimrt.plugins import DOMAIN

EXPORTERS = ["dynamo", "torchscript"]
#: the nodes one exported TSM consists of (Constant: the TorchScript exporter's GELU / scale constants)
TSM_NODES = Counter({"LayerNormalization": 1, "MatMul": 3, "Add": 3, "Div": 1, "Erf": 1, "Mul": 3,
                     "Transpose": 1, "Softmax": 1})


def _ops(model: ir.Model) -> Counter:
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph)


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _slim(model: ir.Model) -> tuple[ir.Model, TokenSlimmingPass]:
    pass_ = TokenSlimmingPass()
    result = pass_(model)
    AttachDecompositionsPass()(result.model)
    return result.model, pass_


@pytest.fixture(scope="module", params=EXPORTERS)
def sit_export(request):
    module, example = tiny_sit(seed=3, batch=2)
    model, feeds = export_torch(module, example, exporter=request.param)
    with torch.no_grad():
        want = module(*example).numpy()
    return request.param, model, feeds, want


def test_sit_modules_fuse_into_token_slim_nodes(sit_export):
    exporter, model, feeds, want = sit_export
    original = _run(model, feeds)[0]
    np.testing.assert_allclose(original, want, atol=1e-5)
    before = _ops(model)
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))  # the fixture stays the original
    slimmed, pass_ = _slim(copy)
    after = _ops(slimmed)

    fused = [n for n in slimmed.graph if n.domain == DOMAIN]
    assert [n.op_type for n in fused] == ["TokenSlim", "TokenSlim"]
    assert all(n.metadata_props[PASS_TAG] == "token_slimming" for n in fused)
    removed = before - after
    if exporter == "torchscript":
        assert removed.pop("Constant") == 8  # 4 per module: √2, 1, 0.5 of the GELU and the scale
    assert removed == Counter({op: 2 * k for op, k in TSM_NODES.items()})  # exactly the two TSMs
    assert after - before == Counter({f"{DOMAIN}::TokenSlim": 2})

    assert pass_.report["modules_fused"] == 2
    assert [(m["tokens_out"], m["hidden"]) for m in pass_.report["modules"]] == [(8, 32), (4, 32)]
    for m in pass_.report["modules"]:
        assert m["scale"] == 0.5 and m["epsilon"] == pytest.approx(1e-5)
    # each TokenSlim reads the patch tokens (the Slice after the CLS) directly
    assert all(n.inputs[0].producer().op_type == "Slice" for n in fused)

    np.testing.assert_allclose(_run(slimmed, feeds)[0], original, atol=1e-5, rtol=0)
    rng = np.random.default_rng(1)  # other images, another batch size
    other = {"pixel_values": rng.standard_normal((3, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(_run(slimmed, other)[0], _run(model, other)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_model_without_tsm_is_unchanged(exporter):
    module, example = tiny_vit(seed=0)
    model, feeds = export_torch(module, example, exporter=exporter)
    before = ir.serde.serialize_model(model).SerializeToString()
    pass_ = TokenSlimmingPass()
    result = pass_(model)
    assert not result.modified
    assert pass_.report == {"modules_fused": 0, "modules": []}
    assert ir.serde.serialize_model(result.model).SerializeToString() == before


class _Variant(TokenSlimming):
    """A TSM written differently: softmax before the transpose, scale as a division, ..."""

    def __init__(self, form: str):
        super().__init__(16, 8, 3, scale=1.0)
        self.form = form
        for p in self.parameters():
            nn.init.normal_(p, std=0.5)

    def forward(self, x):
        logits = self.mlp(self.norm(x))
        if self.form == "softmax_first":  # softmax over tokens (dim 1), then transpose
            return logits.softmax(dim=1).transpose(1, 2) @ x
        if self.form == "divided":  # a temperature
            return (logits / 2.0).transpose(1, 2).softmax(dim=-1) @ x
        if self.form == "unscaled":
            return logits.transpose(1, 2).softmax(dim=-1) @ x
        if self.form == "tanh_gelu":  # another MLP: not the exact GELU, must not match
            hidden = nn.functional.gelu(self.mlp[0](self.norm(x)), approximate="tanh")
            return self.mlp[2](hidden).transpose(1, 2).softmax(dim=-1) @ x
        if self.form == "wrong_axis":  # softmax over the output tokens: not a TSM
            return logits.softmax(dim=-1).transpose(1, 2) @ x
        raise AssertionError(self.form)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("form, fused, scale", [("softmax_first", 1, 1.0), ("divided", 1, 0.5), ("unscaled", 1, 1.0),
                                                ("tanh_gelu", 0, None), ("wrong_axis", 0, None)])
def test_variants(exporter, form, fused, scale):
    module = _Variant(form).eval()
    x = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(0))
    model, feeds = export_torch(module, (x,), exporter=exporter)
    original = _run(model, feeds)
    slimmed, pass_ = _slim(model)
    assert pass_.report["modules_fused"] == fused
    nodes = [n.op_type for n in slimmed.graph if n.op_type != "Constant"]
    if fused:
        assert nodes == ["TokenSlim"]
        assert pass_.report["modules"][0]["scale"] == pytest.approx(scale)
    else:
        assert "TokenSlim" not in nodes and "Softmax" in nodes
    np.testing.assert_allclose(_run(slimmed, feeds)[0], original[0], atol=1e-5, rtol=0)


def test_non_constant_weights_do_not_match():
    """The second Linear's weight computed at run time (here: from an input) is no TSM weight."""

    class RuntimeWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.tsm = _Variant("unscaled")

        def forward(self, x, w2):
            t = self.tsm
            logits = nn.functional.gelu(t.mlp[0](t.norm(x))) @ w2 + t.mlp[2].bias
            return logits.transpose(1, 2).softmax(dim=-1) @ x

    x = torch.randn(2, 11, 16)
    # TorchScript: the dynamo exporter would make w2's first axis a batch axis (export_torch does so for every input)
    model, feeds = export_torch(RuntimeWeight().eval(), (x, torch.randn(8, 3)), exporter="torchscript")
    pass_ = TokenSlimmingPass()
    pass_(model)
    assert pass_.report["modules_fused"] == 0


def test_compile_with_token_slimming_recipe(tmp_path):
    """Through trimrt.compile: the [token_slimming] table fuses both modules; the build's
    compile check (a no-op in tokens) holds it to the original outputs."""
    import trimrt

    manifest = trimrt.compile("examples.models.sit:tiny_sit", {"token_slimming": {"fuse": True}}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "token_slimming")
    assert report["modules_fused"] == 2
    assert "TokenSlim" in manifest["ops"]
    result = trimrt.verify(tmp_path / "b", "examples.models.sit:tiny_sit", samples=4)
    assert result.outputs[0].max_abs < 1e-5
