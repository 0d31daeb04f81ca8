"""The transformer blocks of a graph as the planner and the structured cuts see them: each block's self-attention
(plain Q, K, V and output projections, or ONNX Runtime's fused Attention), its FFN, the whole block to drop, and
every linear layer in it. Found by pattern (`passes.prune_heads`, `passes.prune_ffn`, `passes.drop_blocks`);
finding never changes the graph."""

from __future__ import annotations


from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.calib.data import PRESENT_OUTPUT, InputSpec, is_past_input
from lrdeploy.calib.stats import TensorRequest
from lrdeploy.passes.compose import StructuredCuts
from lrdeploy.passes.drop_blocks import TransformerBlock, block_spans, find_transformer_blocks
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.prune_ffn import FfnBlock, find_ffn_blocks
from lrdeploy.passes.prune_heads import AttentionBlock, find_fused_attention_blocks, match_plain_attention
from lrdeploy.settings.build import BuildConfig
from lrdeploy.stages.block_reach import BlockEnd


def self_attentions(config: BuildConfig, graph: gs.Graph, layers: list[LinearLayer]) -> list[AttentionBlock] | None:
    """The self-attentions of the graph the build cuts: ONNX Runtime's fused ones with `--optimize ort` (their node
    says the head count), else the plain projections with the head size each block's Q is reshaped into (grouped-
    query attention: K's width / head size key/value heads), the model's head count read from the graph, or
    `--num-heads`; None when none of those can be told."""
    if config.optimize == "ort":
        return find_fused_attention_blocks(graph, layers)
    matches = match_plain_attention(graph, layers, config.num_heads)
    if matches is None:
        return None
    blocks = matches.found
    if has_kv_cache(graph):
        for block in blocks:
            block.feeds_cache = True
    return blocks


def has_kv_cache(graph: gs.Graph) -> bool:
    """The model takes or returns a KV cache (`past_key_values.N.*` inputs, `present.N.*` outputs: Optimum's
    decoder_model.onnx returns one without taking it): its attention's key/value head counts are part of its
    interface, which a generation loop feeds back step after step."""
    return (any(is_past_input(InputSpec(t.name, np.dtype(np.float32), tuple(t.shape or ()))) for t in graph.inputs)
            or any(PRESENT_OUTPUT.match(t.name) for t in graph.outputs))


@dataclass
class BlockParts:
    """One transformer block: its self-attention and FFN (either may be missing where it does not match, e.g. a
    model of FFNs only), the block to drop, and every linear layer in it."""

    attention: AttentionBlock | None
    ffn: FfnBlock | None
    block: TransformerBlock | None
    layers: list[LinearLayer]
    end: str | None = None  # the residual stream where the block ends (found for a KV cache's block too)


def find_block_parts(config: BuildConfig, graph: gs.Graph, layers: list[LinearLayer]) -> list[BlockParts]:
    """The blocks in model order, each with the layers between its Q projection and the next block's."""
    ffn = find_ffn_blocks(graph, layers)
    attention = self_attentions(config, graph, layers) or []
    if not attention:  # no self-attention matched: the FFNs are the only blocks
        return [BlockParts(None, block, None, block.layers) for block in ffn]
    dropped = {block.index: block for block in find_transformer_blocks(graph, attention, ffn)}
    spans = block_spans(graph, attention, ffn)
    order = [layer.name for layer in layers]
    starts = [order.index(block.projections[0].name) for block in attention] + [len(order)]
    parts = []
    for index, block in enumerate(attention):
        inside = layers[starts[index]:starts[index + 1]]
        names = {layer.name for layer in inside}
        block_ffn = next((f for f in ffn if f.up.name in names and f.down.name in names), None)
        parts.append(BlockParts(block, block_ffn, dropped.get(index), inside, spans[index][1]))
    return parts


def constrain_parts(parts: list[BlockParts], fixed: StructuredCuts) -> list[BlockParts]:
    """The blocks as a unified plan may still change them once fixed cuts (`--ffn-keep`, `--heads-keep`,
    `--values-keep`, `--drop-blocks`) are decided: a cut FFN or attention offers no option, a block with a fixed
    cut offers no drop, a dropped block nothing; the cut layers are neither split nor counted again."""
    cut = set(fixed.records())
    dropped = {layer.name for _, layers, _ in fixed.dropped for layer in layers}
    kept = []
    for part in parts:
        if any(layer.name in dropped for layer in part.layers):
            continue
        ffn = None if part.ffn is None or part.ffn.down.name in cut else part.ffn
        attention = None if part.attention is None or part.attention.output.name in cut else part.attention
        touched = any(layer.name in cut for layer in part.layers)
        kept.append(BlockParts(attention, ffn, None if touched or fixed.dropped else part.block,
                               [layer for layer in part.layers if layer.name not in cut], part.end))
    return kept


def structure_requests(parts: list[BlockParts]) -> list[TensorRequest]:
    """The moments the cuts need: each FFN's activation, each attention's context."""
    return ([TensorRequest(p.ffn.down.input_name, p.ffn.width) for p in parts if p.ffn]
            + [TensorRequest(p.attention.output.input_name, p.attention.output.d_in) for p in parts if p.attention])


def block_ends(parts: list[BlockParts]) -> list[BlockEnd | None]:
    """The blocks as a measurement at their ends sees them (`stages.block_reach`), in the order of `parts`."""
    return [None if part.end is None else BlockEnd(
        part.end, tuple(layer.name for layer in (*part.attention.projections, part.attention.output))
        if part.attention is not None else (), tuple(layer.name for layer in part.ffn.layers) if part.ffn else (),
        part.block.input_name if part.block is not None else None) for part in parts]
