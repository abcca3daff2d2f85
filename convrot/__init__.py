"""ConvRot W4A4 engine: regular-Hadamard group rotation, int4/int8 quantization, quantized linear layers,
FLUX layer policies and the native checkpoint format. Imports only torch: convrot.checkpoint reads and writes the
safetensors format itself (plain file reads, never unpickling)."""
from .hadamard import SUPPORTED_GROUP_SIZES, fast_regular_hadamard, regular_hadamard
from .linear import ConvRotLinear
from .policy import DEFAULT_PRESET, PRESETS, LayerPolicy

__all__ = ["ConvRotLinear", "LayerPolicy", "PRESETS", "DEFAULT_PRESET", "SUPPORTED_GROUP_SIZES",
           "regular_hadamard", "fast_regular_hadamard"]
