"""The runtime: load a build and run it. Imports numpy and onnxruntime only (no torch,
onnx_ir, onnxscript or tensorrt at import time), so apps can embed it."""

from .manifest import FORMAT_VERSION, Manifest, read_manifest
from .session import Session, TensorInfo, load

__all__ = ["FORMAT_VERSION", "Manifest", "Session", "TensorInfo", "load", "read_manifest"]
