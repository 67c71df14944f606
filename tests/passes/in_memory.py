"""Run the pass pipeline on an exported model in memory and the result on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from trimrt.compiler.pipeline import build_passes, run_pipeline
from trimrt.recipe import load_recipe


def apply_recipe(path, table: str, **options) -> tuple[ir.Model, dict]:
    """The pipeline of the recipe {table: options} on the model at `path`: (model, reports by pass)."""
    model = ir.load(path)
    reports = run_pipeline(model, build_passes(load_recipe({table: options})))
    return model, {r.name: r.details for r in reports}


def run_model(model: ir.Model, feeds: dict) -> np.ndarray:
    """The first output of `model` on `feeds`."""
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def pixels(seed: int = 0, batch: int = 2) -> np.ndarray:
    """Random images for the tiny ViT, [batch, 3, 32, 32]."""
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)
