"""ONNX Runtime's transformer fusions, applied the way a deployment engineer ships a BERT-like encoder:

    LayerNorm(x + y) ─► SkipLayerNormalization          MatMul─Add─Gelu ─► MatMul─BiasGelu
    Q, K, V MatMuls + softmax(QKᵀ)V + reshapes ─► Attention(X, W_qkv[d, 3d], b_qkv)

`onnxruntime.transformers.optimizer` does the rewrite (fusions only: opt_level 0, so the graph stays portable
and ONNX Runtime still applies its own optimizations when a session loads it). Its attention matcher needs the
model's head count and hidden size; they are read from the graph here (the Reshape that splits heads, the
LayerNorm width) unless given. lrdeploy then factorizes INSIDE the fused graph (see `linear_layers` and
`factorize`), so every fusion of the dense model survives compression.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import OptionError
from lrdeploy.passes.layer_nodes import reshape_target_dims

FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "GemmFastGelu")


def attention_geometry(graph: gs.Graph) -> tuple[int, int] | None:
    """(number of heads, hidden size) of the graph's self-attention, or None where it cannot be read: the hidden
    size is the first LayerNormalization's width (without one, the linear layers' most common input width), the head size comes from the Reshapes to [b, s, heads, dim]
    (its dim, or hidden / heads), and the head count is hidden / head size. The head size is voted on, not the
    count: it is the same in every block even after a head cut, when the counts differ."""
    norms = [n for n in graph.nodes if n.op == "LayerNormalization" and isinstance(n.inputs[1], gs.Constant)]
    widths = Counter(int(n.inputs[1].values.shape[0]) for n in graph.nodes  # RMSNorm models: the linear layers'
                     if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.ndim == 2)
    if not norms and not widths:  # most common input width (Q, K, V, O, gate and up read the hidden size)
        return None
    hidden = int(norms[0].inputs[1].values.shape[-1]) if norms else widths.most_common(1)[0][0]
    votes: Counter[int] = Counter()
    for node in graph.nodes:
        dims = reshape_target_dims(node) if node.op == "Reshape" else None
        if dims is None or len(dims) != 4:
            continue
        heads, dim = dims[2], dims[3]
        if dim is not None and dim > 0 and hidden % dim == 0 and hidden // dim > 1:
            votes[dim] += 1
        elif heads is not None and heads > 0 and hidden % heads == 0:
            votes[hidden // heads] += 1
    return (hidden // votes.most_common(1)[0][0], hidden) if votes else None


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each ONNX Runtime fused op the model has (ops it does not have are left out)."""
    counts = Counter(node.op_type for node in model.graph.node if node.op_type in FUSED_OPS)
    return dict(sorted(counts.items()))


def fuse_for_onnxruntime(model: onnx.ModelProto, num_heads: int = 0, hidden_size: int = 0) -> onnx.ModelProto:
    """`model` as ONNX Runtime's BERT optimizer fuses it (a new model; `model` is not changed)."""
    from onnxruntime.transformers import optimizer

    if not num_heads or not hidden_size:
        geometry = attention_geometry(gs.import_onnx(model))
        if geometry is None:
            raise OptionError("cannot tell the model's attention head count and hidden size from its graph; give "
                              "them with --num-heads and --hidden-size")
        num_heads, hidden_size = num_heads or geometry[0], hidden_size or geometry[1]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fused = optimizer.optimize_model(copy, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                     opt_level=0).model
    _heads_from_widths(fused, hidden_size // num_heads)
    domains = {node.domain for node in fused.graph.node} - {"", "ai.onnx"} - {o.domain for o in fused.opset_import}
    fused.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(domains))  # e.g. com.microsoft
    return fused


def _heads_from_widths(model: onnx.ModelProto, head_size: int) -> None:
    """Give each fused Attention the head count its packed weight holds (width / 3 / head size), in place.

    ONNX Runtime's optimizer takes one head count for the whole model and writes it on every Attention it fuses;
    a model whose blocks keep different head counts (a head cut) would then run some blocks with heads of the
    wrong size, silently. Heads are cut whole, so the head size is the same in every block."""
    weights = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Attention" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        width = weights[node.input[1]].dims[-1]
        heads = next((a for a in node.attribute if a.name == "num_heads"), None)
        if heads is not None and width % (3 * head_size) == 0:
            heads.i = width // (3 * head_size)
