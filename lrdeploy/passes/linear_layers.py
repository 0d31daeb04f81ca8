"""Find the linear layers of a graph and normalise each to Y = X·W + b with W of shape [d_in, d_out].

Recognised (anything else that looks like one is listed as skipped, with the reason):

    X ─MatMul(W)─► Y                         pattern "MatMul"
    X ─MatMul(W)─Add(b)─► Y  (b on either side)  pattern "MatMul+Add"
    X ─MatMul(Transpose(Wᵀ))─[Add(b)]─► Y    pattern "MatMul(Transpose)" / "MatMul(Transpose)+Add"
    X ─Gemm(B, C; transB, alpha, beta)─► Y   pattern "Gemm" (W = alpha·B or alpha·Bᵀ, b = beta·C)

and inside graphs fused by ONNX Runtime's transformer optimizer (`ort_fusion`), where the bias is added by
the op that consumes the product (the layer's output tensor is then the product X·W, before the bias):

    X ─MatMul(W)─► BiasGelu(·, b)                     pattern "MatMul+BiasGelu"
    X ─MatMul(W)─► SkipLayerNormalization(·, skip, γ, β[, b])   pattern "MatMul+SkipLayerNormalization"
    X ─Attention(W_qkv[d, 3d], b_qkv)─► context       pattern "Attention" (the packed Q|K|V projection; its
                                                      output tensor is the attention's, not the projection's)

Weights may be initializers or Constant nodes, in float32, float16 or float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.allocate import LayerShape
from lrdeploy.weights import constant_array

FLOAT_TYPES = (np.float16, np.float32, np.float64)
COMPUTED_WEIGHT_OPS = ("Cast", "DequantizeLinear")  # a weight made from a constant at run time (FP16→FP32, int8)
FUSED_BIAS_INPUTS = {"BiasGelu": 1, "SkipLayerNormalization": 4}  # fused ops that add a MatMul's bias: which input
ATTENTION = "Attention"


@dataclass
class LinearLayer:
    """One linear layer as found in the graph; `eligible` False means it is listed but left alone."""

    name: str
    pattern: str
    input_name: str
    output_name: str
    d_in: int
    d_out: int
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    eligible: bool = True
    reason: str = ""
    bias_rank: int = 1  # the rank of the bias constant as the graph spells it ([1, 1, d] broadcasts the output to 3-D)

    def bias_constant(self, values: np.ndarray) -> np.ndarray:
        """New bias values ([n]) shaped as the layer's bias constant was ([1, …, 1, n]), so the Add broadcasts to
        the same output shape as before."""
        values = np.asarray(values)
        return values.reshape((1,) * (self.bias_rank - 1) + values.shape[-1:]) if self.bias_rank > 1 else values

    @property
    def params(self) -> int:
        """Weight parameters (biases are not counted against the budget)."""
        return self.d_in * self.d_out

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype if self.weight is not None else np.dtype(np.float32)

    @property
    def shape(self) -> LayerShape:
        return LayerShape(self.name, self.d_in, self.d_out)

    @property
    def output_is_product(self) -> bool:
        """Whether `output_name` carries X·W (+ b): false for a fused Attention, whose output is the attention's."""
        return self.pattern != ATTENTION

    @property
    def bias_in_consumer(self) -> str | None:
        """The fused op that adds this layer's bias after `output_name` (BiasGelu, SkipLayerNormalization)."""
        consumer = self.pattern.rpartition("+")[2]
        return consumer if consumer in FUSED_BIAS_INPUTS else None


def constant_value(tensor: gs.Tensor) -> tuple[np.ndarray, bool] | None:
    """(value, came through a Transpose) when `tensor` is a constant, a Constant node, an Identity of one (torch's
    exporter writes tied or deduplicated parameters that way) or a Transpose of one."""
    if isinstance(tensor, gs.Constant):
        return constant_array(tensor), False
    if len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
        return np.asarray(producer.attrs["value"].values), False
    if producer.op == "Identity" and len(producer.inputs) == 1:
        return constant_value(producer.inputs[0])
    if producer.op == "Transpose" and len(producer.inputs) == 1:
        inner = constant_value(producer.inputs[0])
        if inner is None or inner[0].ndim != 2:
            return None
        perm = list(producer.attrs.get("perm", [1, 0]))
        return (inner[0].T if perm == [1, 0] else inner[0]), perm == [1, 0]
    return None


def other_uses(tensor: gs.Tensor, user: gs.Node) -> list[gs.Node]:
    """The nodes besides `user` that read `tensor` or the constant behind it (through Identity and Transpose, as
    exporters write tied weights): a tied embedding's Gather, a second MatMul of a reused weight, a subgraph's node."""
    others = [node for node in tensor.outputs if node is not user]
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is not None and producer.op in ("Identity", "Transpose") and len(producer.inputs) == 1:
        others += other_uses(producer.inputs[0], producer)
    return others


def _shared(weight: gs.Tensor, user: gs.Node) -> str | None:
    """Why a layer whose weight is shared is kept dense (None when the weight is its own)."""
    others = other_uses(weight, user)
    if not others:
        return None
    names = ", ".join(f"{node.op} {node.name}".strip() for node in others[:2]) + (", …" if len(others) > 2 else "")
    return (f"weight is shared with {len(others)} other node{'s' * (len(others) > 1)} ({names}: tied or reused); "
            "splitting it would keep the original beside the factors")


def _as_bias(value: np.ndarray, d_out: int) -> np.ndarray | None:
    """`value` as a [d_out] bias if it only varies along the last axis, else None."""
    if value.size == 1:
        return np.full(d_out, value.reshape(-1)[0], dtype=value.dtype)
    if value.shape and value.shape[-1] == d_out and value.size == d_out:
        return value.reshape(d_out)
    return None


def _single_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _layer_name(node: gs.Node, index: int, used: set[str]) -> str:
    name = node.name or f"{node.op}_{index}"
    while name in used:
        name = f"{name}_{index}"
    used.add(name)
    return name


def _match_matmul(node: gs.Node, name: str, graph_outputs: set[str]) -> LinearLayer:
    x, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    found = constant_value(w)

    def skipped(reason: str, d_in: int = 0, d_out: int = 0) -> LinearLayer:
        return LinearLayer(name, "MatMul", x.name, y.name, d_in, d_out, eligible=False, reason=reason)

    if found is None:
        left = constant_value(x)
        if left is not None:
            return skipped("weight is the left operand (W·X); only X·W is factorized")
        producer = w.inputs[0] if w.inputs else None
        if producer is not None and producer.op in COMPUTED_WEIGHT_OPS and producer.inputs and \
                constant_value(producer.inputs[0]) is not None:
            return skipped(f"weight is computed ({producer.op} of a constant): not a constant; fold it into a "
                           "constant first (or export the model unquantized)")
        return skipped("weight is not constant (activation × activation)")
    weight, transposed = found
    if constant_value(x) is not None:
        return skipped("both operands are constant; fold constants first")
    if weight.ndim != 2:
        return skipped(f"weight has rank {weight.ndim}; only 2-D weights are factorized")
    d_in, d_out = weight.shape
    shared = _shared(w, node)
    if shared is not None:
        return skipped(shared, d_in, d_out)
    if weight.dtype.type not in FLOAT_TYPES:
        kind = "is not supported (float16, float32 and float64 are)" if weight.dtype.kind in "fV" or \
            "bfloat16" in str(weight.dtype) else "is not floating point"
        return skipped(f"weight dtype {weight.dtype} {kind}", d_in, d_out)
    pattern = "MatMul(Transpose)" if transposed else "MatMul"
    bias = None
    output_name = y.name
    consumer = _single_consumer(y, graph_outputs)
    fused_bias = FUSED_BIAS_INPUTS.get(consumer.op) if consumer is not None else None
    if fused_bias is not None and consumer.inputs[0] is y:
        bias = None
        if len(consumer.inputs) > fused_bias and consumer.inputs[fused_bias].name:
            found_bias = constant_value(consumer.inputs[fused_bias])
            if found_bias is None:
                return skipped(f"{consumer.op}'s bias is not constant", d_in, d_out)
            bias = _as_bias(found_bias[0], d_out)
        return LinearLayer(name, f"{pattern}+{consumer.op}", x.name, y.name, d_in, d_out, weight, bias)
    if consumer is not None and consumer.op == "Add" and len(consumer.inputs) == 2:
        other = consumer.inputs[1] if consumer.inputs[0] is y else consumer.inputs[0]
        other_value = constant_value(other)
        if other_value is not None:
            bias = _as_bias(other_value[0], d_out)
        if bias is not None:
            pattern += "+Add"
            output_name = consumer.outputs[0].name
            return LinearLayer(name, pattern, x.name, output_name, d_in, d_out, weight, bias,
                               bias_rank=max(1, np.ndim(other_value[0])))
    return LinearLayer(name, pattern, x.name, output_name, d_in, d_out, weight, bias)


def _match_gemm(node: gs.Node, name: str) -> LinearLayer:
    x, b_input = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    found = constant_value(b_input)
    if found is None:
        return LinearLayer(name, "Gemm", x.name, y.name, 0, 0, eligible=False,
                           reason="weight is not constant (activation × activation)")
    value = found[0]
    if node.attrs.get("transA", 0):
        return LinearLayer(name, "Gemm", x.name, y.name, 0, 0, eligible=False,
                           reason="Gemm with transA=1 is not supported")
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    weight = (value.T if node.attrs.get("transB", 0) else value) * np.asarray(alpha, value.dtype)
    d_in, d_out = weight.shape
    shared = _shared(b_input, node)
    if shared is not None:
        return LinearLayer(name, "Gemm", x.name, y.name, d_in, d_out, eligible=False, reason=shared)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        c_value = constant_value(node.inputs[2])
        bias = None if c_value is None else _as_bias(c_value[0], d_out)
        if bias is None:
            return LinearLayer(name, "Gemm", x.name, y.name, d_in, d_out, eligible=False,
                               reason="Gemm's C is not a constant per-column bias")
        bias = bias * np.asarray(beta, bias.dtype)
    return LinearLayer(name, "Gemm", x.name, y.name, d_in, d_out, weight, bias)


def _match_attention(node: gs.Node, name: str) -> LinearLayer:
    """ONNX Runtime's fused Attention: its packed Q|K|V projection X·W_qkv + b_qkv is the linear layer."""
    x, y = node.inputs[0], node.outputs[0]
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if weight is None or weight[0].ndim != 2 or (bias is None and len(node.inputs) > 2 and node.inputs[2].name):
        return LinearLayer(name, "Attention", x.name, y.name, 0, 0, eligible=False,
                           reason="Attention's packed weight or bias is not constant")
    d_in, d_out = weight[0].shape
    return LinearLayer(name, "Attention", x.name, y.name, d_in, d_out, weight[0],
                       None if bias is None else _as_bias(bias[0], d_out))


def find_linear_layers(graph: gs.Graph, rank_multiple: int = 16) -> list[LinearLayer]:
    """Every MatMul/Gemm of `graph` in graph order (ONNX's topological order), eligible or with the reason it is
    skipped. Matching only reads the graph: a layer is known by its input and output tensors, and an unnamed
    or duplicate node gets a unique layer name without being renamed.

    A layer is eligible when its weight is a constant 2-D float matrix and a rank of `rank_multiple`
    would save parameters.
    """
    graph_outputs = {t.name for t in graph.outputs}
    used: set[str] = set()
    layers = []
    for index, node in enumerate(graph.nodes):
        if node.op not in ("MatMul", "Gemm", "Attention"):
            continue
        name = _layer_name(node, index, used)
        layer = (_match_gemm(node, name) if node.op == "Gemm" else _match_attention(node, name)
                 if node.op == "Attention" else _match_matmul(node, name, graph_outputs))
        if layer.eligible and not layer.shape.saves(rank_multiple):
            layer.eligible = False
            layer.reason = f"too small: rank {rank_multiple} would not save parameters ({layer.d_in}×{layer.d_out})"
        layers.append(layer)
    return layers
