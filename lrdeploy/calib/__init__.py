"""Calibration data (loading, checking, batching) and statistics collection with ONNX Runtime.

Knows nothing of passes: it is handed the names of the tensors whose moments to collect.
"""
