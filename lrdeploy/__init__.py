"""lrdeploy: calibrated low-rank compression of ONNX transformers for NVIDIA inference.

Importing this package is cheap: onnxruntime, torch and TensorRT are imported lazily by the modules
that need them, so `import lrdeploy` and `lrdeploy --help` work on a machine without them.
"""

__version__ = "0.1.0"
