"""The nodes of a plain linear layer (MatMul by a constant, optional bias Add) in a graph, for passes that
rewrite its weights in place (`prune_ffn`, `prune_heads`). Reads only; `replace_input` is the one edit."""

from __future__ import annotations

from typing import Mapping

import onnx_graphsurgeon as gs

from lrdeploy.passes.linear_layers import LinearLayer


def is_plain(layer: LinearLayer) -> bool:
    """A MatMul by a constant weight, with or without its Add: the forms this pass can slice."""
    return layer.weight is not None and layer.pattern in ("MatMul", "MatMul+Add")


def matmul_and_add(tensors: Mapping[str, gs.Tensor], layer: LinearLayer) -> tuple[gs.Node, gs.Node | None]:
    """The MatMul node of a plain layer, and its bias Add (None without one)."""
    producer = tensors[layer.output_name].inputs[0]
    if producer.op == "MatMul":
        return producer, None
    product = next(t for t in producer.inputs if t.inputs and t.inputs[0].op == "MatMul")
    return product.inputs[0], producer


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """`node` reads `new` where it read `old`."""
    node.inputs[[i for i, t in enumerate(node.inputs) if t is old][0]] = new
