"""Typed exceptions. Every error a user can cause is a TrimrtError with a one-line message
that names the problem and what to do; the CLI prints it and exits with code 2."""


class TrimrtError(Exception):
    """Base class of every error trimrt raises on purpose."""


class RecipeError(TrimrtError):
    """The recipe (TOML file or dict) is invalid."""


class ModelLoadError(TrimrtError):
    """The model could not be read or exported (not ONNX, missing file, bad factory)."""


class StructureError(TrimrtError):
    """Structure analysis could not find the transformer parts a pass needs."""


class BuildError(TrimrtError):
    """A build cannot be produced correctly, so none is written."""


class BuildLoadError(TrimrtError):
    """A build directory is missing, corrupted or of an unsupported format."""


class InputError(TrimrtError):
    """Feeds given to a Session (or to run/verify/bench) do not match the model's inputs."""


class BackendUnavailableError(TrimrtError):
    """The requested backend (e.g. TensorRT) is not installed or has no device here."""


class CalibrationError(TrimrtError):
    """Calibration data for quantization is missing, unreadable or does not fit the model's inputs."""


class SessionClosedError(TrimrtError):
    """A Session was used after close() (or after its `with` block ended)."""


class RunError(TrimrtError):
    """ONNX Runtime failed while running a build on feeds that passed validation."""


class ServingError(TrimrtError):
    """A build cannot be exported to a serving engine, or served, as asked."""


class TuneError(TrimrtError):
    """`trimrt tune` cannot search as asked (unsupported model, bad data, an exhausted budget)."""
