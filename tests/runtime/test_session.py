"""Session: feeds validation, hash checks, thread safety, import without heavy deps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import trimrt
from trimrt.errors import BuildLoadError, InputError


@pytest.fixture(scope="module")
def build(tiny_vit_onnx, tmp_path_factory):
    _, path = tiny_vit_onnx
    out = tmp_path_factory.mktemp("rt") / "build"
    trimrt.compile(str(path), {"token_pruning": {"layers": [1], "keep": 0.5}}, out)
    return out


def test_inputs_outputs_and_run(build, images):
    session = trimrt.load(build)
    assert [i.describe() for i in session.inputs] == ["pixel_values: float32[batch, 3, 32, 32]"]
    out = session.run({"pixel_values": images})
    assert list(out) == [o.name for o in session.outputs] and out["logits"].shape == (3, 10)
    np.testing.assert_array_equal(session(pixel_values=images)["logits"], out["logits"])


@pytest.mark.parametrize("feeds,message", [
    ({}, r"missing input\(s\) \['pixel_values'\]; expected pixel_values: float32\[batch, 3, 32, 32\]"),
    ({"pixel_values": np.zeros((1, 3, 32, 32), np.float32), "extra": np.zeros(1)}, r"unknown input\(s\) \['extra'\]"),
    ({"pixel_values": np.zeros((1, 3, 32, 32))}, r"input 'pixel_values' must be float32, got float64 \(cast it"),
    ({"pixel_values": np.zeros((3, 32, 32), np.float32)}, r"must have rank 4"),
    ({"pixel_values": np.zeros((1, 3, 30, 32), np.float32)}, r"axis 2 must be 32"),
])
def test_bad_feeds_are_named(build, feeds, message):
    with pytest.raises(InputError, match=message):
        trimrt.load(build).run(feeds)


def test_tampered_build_is_refused(build, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(BuildLoadError, match="model.onnx does not match its sha256"):
        trimrt.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildLoadError, match="format version 99 is not supported"):
        trimrt.load(copy)
    with pytest.raises(BuildLoadError, match="is not a trimrt build"):
        trimrt.load(tmp_path)


def test_concurrent_runs_agree(build):
    session = trimrt.load(build)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    expected = [session.run({"pixel_values": b})["logits"] for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda b: session.run({"pixel_values": b})["logits"], batches * 3))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, expected[i % 8])


def test_runtime_imports_without_torch_onnxscript_tensorrt(build):
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "onnxscript", "tensorrt", "triton", "onnx_ir"):
            sys.modules[name] = None  # any import of these now fails
        import numpy as np
        import trimrt
        s = trimrt.load({str(build)!r})
        out = s.run({{"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}})
        print(out["logits"].shape)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 10)"
