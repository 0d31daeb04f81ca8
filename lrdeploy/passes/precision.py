"""A model's FP16 twin, as ONNX Runtime's float16 converter makes it:

    x(fp32) ─MatMul(W fp32)─► …   ⇒   x(fp32) ─Cast(fp16)─MatMul(W fp16)─► … ─Cast(fp32)─► y(fp32)

Weights and activations become FP16; graph inputs and outputs keep their types (keep_io_types), so the same
feeds run both models. Ops ONNX Runtime's CUDA provider has no FP16 kernel for stay FP32 behind casts (the
converter's own block list).
"""

from __future__ import annotations

import onnx

from lrdeploy.errors import OptionError

HALF_PRECISIONS = ("fp16",)  # bf16: ONNX Runtime's converter writes FP16 only


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new FP16 model (`model` is not changed); inputs and outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return convert_float_to_float16(copy, keep_io_types=True, disable_shape_infer=True)


def check_half_precision(precision: str) -> None:
    if precision not in ("fp32", *HALF_PRECISIONS):
        raise OptionError(f"--precision {precision} is not available on ONNX Runtime here: its converter writes fp16; "
                          "use --precision fp16 or fp32")
