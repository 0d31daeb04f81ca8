"""Compression inside PyTorch: feature PCA on nn.Linear (same maths as the ONNX path), label-free
distillation. torch is imported by these modules, so import them only where torch is installed."""
