"""Graph rewrites, one module per pass. Each is an onnx_ir InPlacePass taking its options
(a frozen dataclass from the Recipe) at construction and recording what it did in `report`."""

from .base import PASS_TAG, TrimrtPass
from .kv_attention import KVAttentionPass
from .mixture_of_depths import MixtureOfDepthsPass
from .ort_fusion import OrtFusionPass
from .packed_projections import PackedProjectionsPass
from .quantization import QuantizationPass
from .sparse_attention import SparseAttentionPass
from .token_merging import TokenMergingPass
from .token_pruning import TokenPruningPass
from .token_slimming import TokenSlimmingPass
from .trim_padding import TrimPaddingPass
from .unfuse_attention import UnfuseAttentionPass

__all__ = ["PASS_TAG", "TrimrtPass", "KVAttentionPass", "MixtureOfDepthsPass", "OrtFusionPass", "PackedProjectionsPass", "QuantizationPass", "SparseAttentionPass", "TokenMergingPass", "TokenPruningPass", "TokenSlimmingPass", "TrimPaddingPass",
           "UnfuseAttentionPass"]
