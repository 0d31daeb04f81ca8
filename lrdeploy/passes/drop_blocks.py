"""Drop whole transformer blocks: a dropped block becomes the identity on the residual stream.

    H_in ─[attention, residual, LayerNorm, FFN, residual, LayerNorm]─► H_out ─► next block
        ⇒  H_in ─Identity─► H_out ─► next block           (cleanup removes the block's nodes)

A block is found from its self-attention (`prune_heads.find_attention_blocks`): H_in is the tensor its Q, K and
V read; H_out is what the next block's Q, K and V read, or, for the last block, the LayerNorm after the last
FFN's residual Add. Matching only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

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


def find_transformer_blocks(graph: gs.Graph, attention: list[AttentionBlock],
                            ffn: list[FfnBlock]) -> list[TransformerBlock]:
    """The blocks in model order; the last one needs its FFN (to find where its residual stream ends)."""
    blocks = []
    for index, block in enumerate(attention):
        if index + 1 < len(attention):
            output = attention[index + 1].input_name
        else:
            last_ffn = next((f for f in reversed(ffn) if f.up.input_name != block.input_name), None)
            output = _after_residual(graph, last_ffn) if last_ffn is not None else None
        if output is not None:
            blocks.append(TransformerBlock(f"block{index}", block.input_name, output))
    return blocks


def drop_block(graph: gs.Graph, block: TransformerBlock) -> None:
    """Make `block` the identity (in place): its output tensor now copies its input."""
    tensors = graph.tensors()
    output = tensors[block.output_name]
    output.inputs.clear()
    Scope(graph, f"lrdeploy_dropped/{block.name}").op("Identity", "identity", [tensors[block.input_name]],
                                                       output=output)
