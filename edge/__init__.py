"""effmod-edge: EfficientMod from PyTorch to ONNX, TFLite and Core ML, verified."""

from edge.errors import EffmodError

__version__ = "0.1.0"
__all__ = ["EffmodError", "__version__"]
