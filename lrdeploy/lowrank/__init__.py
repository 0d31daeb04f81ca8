"""The maths of low-rank compression, numpy only: moments, decompositions, rank allocation.

Shared by the ONNX passes and the PyTorch path so there is one implementation of it. Knows no ONNX.
Row convention throughout: Y = X·W + b with W of shape [d_in, d_out].
"""
