"""Drop whole transformer blocks: a dropped block becomes the identity on the residual stream.

    H_in ─[attention, residual, LayerNorm, FFN, residual, LayerNorm]─► H_out ─► next block
        ⇒  H_in ─Identity─► H_out ─► next block           (cleanup removes the block's nodes)

A block is found from its self-attention (`prune_heads.find_attention_blocks`): H_in is the tensor its Q, K and
V read; H_out is what the next block's Q, K and V read, or, for the last block, the LayerNorm after the last
FFN's residual Add. Matching only reads the graph, and takes a block only where nothing outside it reads a
tensor inside it: a pre-LayerNorm block's residual stream runs past the tensor the next block reads, so the
identity there would leave the block computed and change the outputs (refused, with that reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from lrdeploy.errors import InternalError
from lrdeploy.passes.contract import Matches, PassResult, committed
from lrdeploy.passes.naming import Scope
from lrdeploy.passes.prune_ffn import FfnBlock
from lrdeploy.passes.prune_heads import AttentionBlock

NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization")


@dataclass
class TransformerBlock:
    """One block's residual-stream input and output tensors (named as in the graph)."""

    name: str
    input_name: str
    output_name: str
    products: tuple[str, ...] = ()  # its MatMul/Gemm/Attention nodes: what a drop must remove


def _after_residual(graph: gs.Graph, ffn: FfnBlock) -> str | None:
    """The normalised residual stream after an FFN's down projection: Add(·, skip) then a LayerNorm."""
    tensor = graph.tensors()[ffn.down.output_name]
    for _ in range(2):
        consumers = tensor.outputs
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op in NORMS:
            return node.outputs[0].name
        if node.op != "Add":
            return None
        tensor = node.outputs[0]
    return None


def _reached(start: gs.Tensor, stop: str, forward: bool) -> dict[int, gs.Node]:
    """The nodes reached from `start` (through consumers, or back through producers), not past the tensor `stop`."""
    seen: dict[int, gs.Node] = {}
    frontier = [start]
    while frontier:
        tensor = frontier.pop()
        if tensor.name == stop:
            continue
        for node in (tensor.outputs if forward else tensor.inputs):
            if id(node) not in seen:
                seen[id(node)] = node
                frontier += list(node.outputs if forward else node.inputs)
    return seen


def _block_nodes(graph: gs.Graph, input_name: str, output_name: str) -> list[gs.Node]:
    """The nodes on the ways from the tensor `input_name` to the tensor `output_name`."""
    tensors = graph.tensors()
    after = _reached(tensors[input_name], output_name, forward=True)
    before = _reached(tensors[output_name], input_name, forward=False)
    return [node for key, node in after.items() if key in before]


RESIDUAL_JOINS = ("Add", "SkipLayerNormalization")  # where a block adds its branch to its input


def _not_the_stream(graph: gs.Graph, input_name: str) -> str | None:
    """Why the tensor a block's projections read is not the residual stream itself (None when it is: the block's
    residual join reads it too, as in post-LayerNorm blocks); in a pre-LayerNorm block it is LayerNorm(stream)."""
    if any(node.op in RESIDUAL_JOINS for node in graph.tensors()[input_name].outputs):
        return None
    return (f"its projections read {input_name!r}, a normalised copy of the residual stream, not the stream: a "
            "pre-LayerNorm block; dropping one is not supported yet")


PRODUCTS = ("MatMul", "Gemm", "Attention")  # where the block's values are made (shape and mask work is not)


def _escape(graph: gs.Graph, input_name: str, output_name: str) -> str | None:
    """Why the block from `input_name` to `output_name` cannot become the identity (None when it can): something
    outside it reads a value the block computes (a pre-LayerNorm block's residual stream, which the next block
    adds to). Shape and mask work inside the block that later blocks share (torch's exporter derives the mask's
    shape from the hidden states) is not the block's value and stays when it is dropped."""
    nodes = _block_nodes(graph, input_name, output_name)
    inside = {id(node) for node in nodes}
    valued: dict[int, gs.Node] = {}
    for node in nodes:
        if node.op in PRODUCTS:
            for tensor in node.outputs:
                valued.update((key, n) for key, n in _reached(tensor, output_name, forward=True).items()
                              if key in inside)
            valued[id(node)] = node
    graph_outputs = {t.name for t in graph.outputs}
    for node in valued.values():
        for tensor in node.outputs:
            if tensor.name == output_name:
                continue
            outside = [n for n in tensor.outputs if id(n) not in inside]
            if outside or tensor.name in graph_outputs:
                reader = outside[0].name if outside else "the graph's outputs"
                return (f"{tensor.name!r} inside it is also read by {reader}: a pre-LayerNorm block (its residual "
                        "stream bypasses the tensor the next block reads); dropping one is not supported yet")
    return None


def match_transformer_blocks(graph: gs.Graph, attention: list[AttentionBlock],
                             ffn: list[FfnBlock]) -> Matches[TransformerBlock]:
    """The blocks in model order that can become the identity; the last one needs its FFN (to find where its
    residual stream ends). A block that cannot says why."""
    matches: Matches[TransformerBlock] = Matches()
    for index, block in enumerate(attention):
        name = f"block{index}"
        if index + 1 < len(attention):
            output = attention[index + 1].input_name
        else:
            last_ffn = next((f for f in reversed(ffn) if f.up.input_name != block.input_name), None)
            output = _after_residual(graph, last_ffn) if last_ffn is not None else None
        if output is None:
            matches.refuse(name, "the last block's end (its FFN's residual Add, then a LayerNorm) was not found")
            continue
        reason = _not_the_stream(graph, block.input_name) or _escape(graph, block.input_name, output)
        if reason is None:
            products = tuple(node.name for node in _block_nodes(graph, block.input_name, output)
                             if node.op in PRODUCTS and node.name)  # unnamed nodes cannot be told apart
            matches.found.append(TransformerBlock(name, block.input_name, output, products))
        else:
            matches.refuse(name, reason)
    return matches


def find_transformer_blocks(graph: gs.Graph, attention: list[AttentionBlock],
                            ffn: list[FfnBlock]) -> list[TransformerBlock]:
    """The blocks `match_transformer_blocks` finds."""
    return match_transformer_blocks(graph, attention, ffn).found


def drop_block(graph: gs.Graph, block: TransformerBlock) -> PassResult:
    """Make `block` the identity (in place): its output tensor now copies its input, and its nodes go."""
    before = len(graph.nodes)
    tensors = graph.tensors()
    output = tensors[block.output_name]
    output.inputs.clear()
    Scope(graph, f"lrdeploy_dropped/{block.name}").op("Identity", "identity", [tensors[block.input_name]],
                                                       output=output)
    graph.cleanup()
    left = sorted(set(block.products) & {node.name for node in graph.nodes})
    if left:
        raise InternalError(f"dropping {block.name} left {len(left)} of its products in the graph ({left[0]}, ...): "
                            "the block is still computed")
    return committed(graph, blocks_dropped=1, nodes_removed=before + 1 - len(graph.nodes))
