"""Exports: PyTorch → ONNX (sentence embedders today)."""
