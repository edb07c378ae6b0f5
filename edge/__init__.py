"""effmod-edge: EfficientMod from PyTorch to ONNX, TFLite and Core ML, verified."""

import os

from edge.errors import EffmodError

# No network at run time: onnxruntime's Linux builds send usage events (DNS lookups of
# mobile.events.data.microsoft.com, seen from onnx2tf's onnxsim subprocesses) unless
# this is set. Set before any onnxruntime import; subprocesses inherit it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
__all__ = ["EffmodError", "__version__"]
