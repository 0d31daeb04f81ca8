"""Drop whole transformer blocks: a dropped block becomes the identity on the residual stream.

    post-LayerNorm (BERT):  H_in ─[attention, residual, LayerNorm, FFN, residual, LayerNorm]─► H_out
    pre-LayerNorm (ViT, GPT, Llama, Whisper):
                            H_in ─[Norm, attention, residual, Norm, FFN, residual]─► H_out
        ⇒  H_in ─Identity─► H_out ─► next block           (cleanup removes the block's nodes)

A block is found from its self-attention (`prune_heads.find_attention_blocks`). H_in is the residual stream the
block starts from: the tensor its Q, K and V read where the block's residual Add reads it too (post-LN), else
the input of the norm that made it (pre-LN: LayerNorm, SimplifiedLayerNormalization, or RMSNorm spelled out in
elementwise ops). H_out is the next block's H_in; for the last block, after its FFN's residual Add: the
LayerNorm that follows (post-LN) or the Add itself (pre-LN, whose final norm is not the block's). Matching only
reads the graph, and takes a block only where nothing outside it reads a value inside it (a KV cache's
`present` outputs, for one): the identity would leave such a block computed (refused, with that reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from lrdeploy.errors import InternalError
from lrdeploy.passes.contract import Matches, PassResult, committed
from lrdeploy.passes.linear_layers import LinearLayer
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

    @property
    def index(self) -> int:
        """Its place among the model's self-attentions (block0 is the first)."""
        return int(self.name.removeprefix("block"))

    def weighted_layers(self, layers: list[LinearLayer]) -> list[LinearLayer]:
        """Those of `layers` (e.g. every layer from its Q projection to the next block's) that dropping it removes:
        its own products with a weight, not a classifier or LM head after the last block."""
        return [layer for layer in layers if layer.weight is not None and layer.name in self.products]


def _residual_join(node: gs.Node) -> bool:
    """A node where a block adds its branch to the residual stream: an Add of two computed tensors (an Add with
    a constant is a bias or a norm's epsilon), or ONNX Runtime's SkipLayerNormalization."""
    if node.op == "SkipLayerNormalization":
        return True
    return node.op == "Add" and not any(isinstance(t, gs.Constant) for t in node.inputs)


def _after_residual(graph: gs.Graph, ffn: FfnBlock, pre_norm: bool) -> str | None:
    """Where the last block's residual stream ends after its FFN's down projection: the residual Add itself
    (pre-LN), or the LayerNorm that follows it (post-LN). A bias Add may come first."""
    tensor = graph.tensors()[ffn.down.output_name]
    for _ in range(3):
        consumers = tensor.outputs
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op in NORMS and not pre_norm:
            return node.outputs[0].name
        if node.op == "Reshape":  # back to [b, s, d] after a Gemm on [tokens, d] (GPT-2)
            tensor = node.outputs[0]
            continue
        if node.op != "Add":
            return None
        tensor = node.outputs[0]
        if pre_norm and _residual_join(node):
            return tensor.name
    return None


NORM_STEPS = 12  # the most nodes between the residual stream and a normalised copy (RMSNorm spelled out: ~7)
NOT_NORMS = ("MatMul", "Gemm", "Attention", "Softmax", "Gather", "Concat", "Transpose")
# Swin partitions the normalised stream into windows (Reshape, Transpose; shifted: Slice and Concat) before its
# projections read it: where no stream is found within a norm's reach, look again through that layout work
NOT_NORMS_OR_LAYOUT = ("MatMul", "Gemm", "Attention", "Softmax", "Gather")
WINDOW_STEPS = 24


def residual_stream(graph: gs.Graph, input_name: str) -> str | None:
    """The residual stream a block's projections read `input_name` from: `input_name` itself where a residual
    join reads it too (post-LN), else the nearest tensor before it, within a norm's few elementwise nodes, that
    a residual join reads (pre-LN); None when there is none (no residual stream in sight)."""
    tensors = graph.tensors()
    for not_norms, steps in ((NOT_NORMS, NORM_STEPS), (NOT_NORMS_OR_LAYOUT, WINDOW_STEPS)):
        frontier, seen = [tensors[input_name]], set()
        for _ in range(steps):
            following = []
            for tensor in frontier:
                if tensor.name in seen or isinstance(tensor, gs.Constant):
                    continue
                seen.add(tensor.name)
                if any(_residual_join(node) for node in tensor.outputs):
                    return tensor.name
                following += [t for node in tensor.inputs if node.op not in not_norms for t in node.inputs]
            frontier = following
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


PRODUCTS = ("MatMul", "Gemm", "Attention")  # where the block's values are made (shape and mask work is not)


def _escape(graph: gs.Graph, input_name: str, output_name: str) -> str | None:
    """Why the block from `input_name` to `output_name` cannot become the identity (None when it can): something
    outside it reads a value the block computes (a KV cache's `present` output, a residual stream that bypasses
    `output_name`). Shape and mask work inside the block that later blocks share (torch's exporter derives the mask's
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
                return (f"{tensor.name!r} inside it is also read by {reader}: the block would still be computed "
                        "(or an output lost) if it became the identity")
    return None


def _foreign_layer(graph: gs.Graph, input_name: str, output_name: str, own: set[str]) -> str | None:
    """Why the block may not become the identity when its span holds a weighted layer that belongs to no
    attention or FFN and changes the width (Swin's patch merging between stages); a cross-attention's square
    projections (Whisper's and T5's decoders) are the block's own."""
    for node in _block_nodes(graph, input_name, output_name):
        weight = node.inputs[1] if node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
        if not isinstance(weight, gs.Constant) or weight.values.ndim != 2 or weight.shape[0] == weight.shape[1]:
            continue
        produced = {tensor.name for tensor in node.outputs}
        bias_added = {t.name for consumer in node.outputs[0].outputs if consumer.op == "Add" for t in consumer.outputs}
        if not (produced | bias_added) & own:
            return (f"it spans {node.name or node.outputs[0].name!r}, a layer of no attention or FFN that changes the "
                    f"width {weight.shape[0]} → {weight.shape[1]} (e.g. a patch merging)")
    return None


def block_spans(graph: gs.Graph, attention: list[AttentionBlock],
                ffn: list[FfnBlock]) -> list[tuple[str | None, str | None]]:
    """Per self-attention, in model order: the residual stream its block starts from and where that stream ends
    after it (None where not found; the last block needs its FFN to find its end). Whether the block could become
    the identity is not asked here (a KV cache's block has a span too)."""
    streams = [residual_stream(graph, block.input_name) for block in attention]
    spans = []
    for index, block in enumerate(attention):
        start = streams[index]
        if start is None:
            spans.append((None, None))
            continue
        output = streams[index + 1] if index + 1 < len(attention) else None
        if output is None or block.output.name not in {n.name for n in _block_nodes(graph, start, output)}:
            # the last block, or the last of a tower (CLIP's text tower ends where its vision tower starts): the
            # block ends at its own FFN's residual join
            own_ffn = ffn[index] if len(ffn) == len(attention) else next(
                (f for f in reversed(ffn) if f.up.input_name != block.input_name), None)
            output = (_after_residual(graph, own_ffn, pre_norm=start != block.input_name)
                      if own_ffn is not None else None)
        spans.append((start, output))
    return spans


def match_transformer_blocks(graph: gs.Graph, attention: list[AttentionBlock],
                             ffn: list[FfnBlock]) -> Matches[TransformerBlock]:
    """The blocks in model order that can become the identity; the last one needs its FFN (to find where its
    residual stream ends). A block that cannot says why."""
    matches: Matches[TransformerBlock] = Matches()
    own = {layer.output_name for block in attention for layer in (*block.projections, block.output)} | {
        layer.output_name for block in ffn for layer in block.layers}
    for index, (block, (start, output)) in enumerate(zip(attention, block_spans(graph, attention, ffn))):
        name = f"block{index}"
        if start is None:
            matches.refuse(name, f"no residual stream found before {block.input_name!r} (no Add of the block's "
                                 "input and its branch within a norm's reach)")
            continue
        if output is None:
            matches.refuse(name, "the block's end (its FFN's residual Add, or the next block's stream) was not found")
            continue
        reason = _escape(graph, start, output) or _foreign_layer(graph, start, output, own)
        if reason is None:
            products = tuple(node.name for node in _block_nodes(graph, start, output)
                             if node.op in PRODUCTS and node.name)  # unnamed nodes cannot be told apart
            matches.found.append(TransformerBlock(name, start, output, products))
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
