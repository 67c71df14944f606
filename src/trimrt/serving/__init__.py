"""Serving at scale on the engines users already run: trimrt writes no server of its own.

- `triton.export_triton`: a Triton Inference Server model repository for a build
  (`onnxruntime_onnx` for its portable model.onnx, a `python`-backend model running trimrt's
  runtime, `tensorrt_plan` for an engine), every config.pbtxt checked against Triton's schema;
- `ray_serve.serve_build`: a Ray Serve deployment holding a Session, with dynamic batching,
  replicas, JSON / npz bodies, and an OpenAI-compatible completions endpoint for decoders;
- `batching`: the one definition of how requests are batched without changing any answer
  (both servers use it, so both return what `Session.run` returns for each request alone).

Ray and tritonclient are optional (`pip install trimrt[serve]`) and imported when used.
"""
