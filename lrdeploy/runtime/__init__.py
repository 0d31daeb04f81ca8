"""Model execution behind small, lazily imported helpers (ONNX Runtime today)."""
