"""Remove attention heads: keep k of a self-attention's H heads (head dim h_d = d / H).

    X ─┬─ Q(W_q[d,d]) ─Reshape[b,s,H,h_d]─┐
       ├─ K(W_k[d,d]) ─Reshape[b,s,H,h_d]─┼─ softmax(QKᵀ/√h_d)·V ─Reshape[b,s,d]─ O(W_o[d,d], b_o) ─► Y
       └─ V(W_v[d,d]) ─Reshape[b,s,H,h_d]─┘
    ⇒  W_q, W_k, W_v (and biases) keep the kept heads' columns, shape constants say k heads (or k·h_d wide),
       W_o keeps their rows refit by least squares to reproduce Y (`lowrank.neurons.cut_groups`).

ONNX Runtime's fused form packs the three projections in one weight; the same cut slices it per part:

    X ─Attention(W_qkv[d,3d], b_qkv, num_heads=H)─► context[b,s,d] ─O(W_o)─► Y
    ⇒  X ─Attention(W_qkv[:, S ∪ d+S ∪ 2d+S], b_qkv[same], num_heads=k)─► context[b,s,k·h_d] ─O(W_o′)─► Y

(S: the kept heads' feature indices; ONNX Runtime reads the head size as the packed width / 3 / num_heads.)

Matched on plain exports (three MatMul(+Add) layers reading one tensor, then the output projection reading the
merged context) and on the fused graph (an Attention node, then the layer reading its output); a Reshape whose
target shape is computed (torch's exporter writes -1 for the head axis) needs no change, a constant one is
replaced per block. Matching only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.neurons import NeuronCut
from lrdeploy.passes.contract import Matches, PassResult, committed
from lrdeploy.passes.layer_nodes import (forget_shapes, is_plain, is_sliceable, matmul_and_add, reshape_target_dims,
                                         resize_shape_axis, set_bias, set_weight)
from lrdeploy.passes.linear_layers import LinearLayer, constant_value
from lrdeploy.passes.naming import Scope
from lrdeploy.passes.ort_fusion import attention_geometry


PACKED_PARTS = 3  # Q, K and V in a fused Attention's packed weight


@dataclass
class AttentionBlock:
    """One self-attention: its input projections (Q, K and V as three layers, or a fused Attention's one packed
    layer), its output projection, its query head count and its key/value head count (fewer with grouped-query
    attention: each key/value head serves `heads // kv_heads` query heads). A cut removes whole units: a key/value
    head with the query heads it serves (one head each without grouping)."""

    projections: list[LinearLayer]
    output: LinearLayer
    heads: int
    kv_heads: int = 0  # 0: as many as query heads
    feeds_cache: bool = False  # its keys and values are a KV cache's outputs: their head count is an interface
    split: str | None = None  # one fused Q|K|V projection cut in three by this Split node (GPT-2's c_attn)

    def __post_init__(self) -> None:
        self.kv_heads = self.kv_heads or self.heads

    @property
    def packed(self) -> bool:
        return len(self.projections) == 1

    @property
    def input_name(self) -> str:
        """The tensor the block's projections read (the residual stream entering the block)."""
        return self.projections[0].input_name

    @property
    def d_in(self) -> int:
        return self.projections[0].d_in

    @property
    def width(self) -> int:
        """The context's width: heads × head dim."""
        return self.output.d_in

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def units(self) -> int:
        """What a head cut counts and removes: key/value heads, each with its query heads."""
        return self.kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def params_per_unit(self) -> int:
        """Weights one unit holds: its query heads' Q columns and output rows, its key and value head's columns."""
        return self.head_dim * (self.group_size * (self.d_in + self.output.d_out) + 2 * self.d_in)

    def projection_widths(self, kept_width: int) -> list[int]:
        """Each input projection's output width when the context is `kept_width` wide."""
        if self.packed:
            return [kept_width * PACKED_PARTS]
        return [kept_width, kept_width // self.group_size, kept_width // self.group_size]

    def kept_columns(self, kept_units: list[int], features: np.ndarray) -> list[np.ndarray]:
        """The columns Q, K and V keep for `kept_units`: Q the context `features` of their query heads, K and V the
        columns of their key/value heads (the same as Q's without grouping)."""
        if self.kv_heads == self.heads:
            return [features] * 3
        kv = np.concatenate([unit * self.head_dim + np.arange(self.head_dim) for unit in kept_units])
        return [features, kv, kv]

    def describe(self, kept_units: int) -> str:
        """How many heads a cut to `kept_units` keeps, in the block's own terms."""
        if self.kv_heads == self.heads:
            return f"{kept_units} of {self.heads} heads"
        return (f"{kept_units} of {self.kv_heads} key/value heads ({kept_units * self.group_size} of {self.heads} "
                "query heads)")


def find_qkv_triples(layers: list[LinearLayer]) -> list[tuple[list[LinearLayer], LinearLayer]]:
    """([Q, K, V], output projection) of every plain self-attention: three consecutive plain layers reading one
    tensor, K and V equally wide and Q as wide or a whole multiple wider (grouped-query attention), followed (in
    model order) by the layer reading a tensor of Q's width."""
    plain = [layer for layer in layers if is_plain(layer)]
    triples: list[tuple[list[LinearLayer], LinearLayer]] = []
    for index, layer in enumerate(plain):
        readers = [other for other in plain[index:index + 3] if other.input_name == layer.input_name]
        if len(readers) != 3:
            continue
        query, key, value = readers
        if key.d_out != value.d_out or query.d_out % key.d_out:
            continue
        if triples and layer in triples[-1][0]:
            continue
        following = plain[index + 3] if index + 3 < len(plain) else None
        if following is not None and following.d_in == query.d_out and following.input_name != layer.input_name:
            triples.append((readers, following))
    return triples


def match_attention_blocks(layers: list[LinearLayer], heads: int | None = None,
                           head_dims: dict[str, int] | None = None) -> Matches[AttentionBlock]:
    """The plain self-attentions (`find_qkv_triples`). The head size is the one the graph reshapes each block's Q
    into (`head_dims`, by Q's name), else d / `heads` (the model's count, e.g. --num-heads); the same in every
    block, so a block narrowed by an earlier head cut is read with its own count. Key/value heads are K's width /
    head size. Shapes of attention that are not taken say why."""
    matches: Matches[AttentionBlock] = Matches()
    triples = find_qkv_triples(layers)
    for projections, output in triples:
        query, key, _ = projections
        head_dim = (head_dims or {}).get(query.name)
        if head_dim is None and heads:
            head_dim, rest = divmod(query.d_in, heads)
            head_dim = head_dim if not rest else None
        if not head_dim or output.d_in % head_dim or key.d_out % head_dim:
            told = f"{heads} heads do not divide the width {query.d_in} or the context {output.d_in}" if heads else \
                "the head size cannot be read from the graph"
            matches.refuse(query.name, f"{told}; give the head count with --num-heads")
            continue
        matches.found.append(AttentionBlock(projections, output, output.d_in // head_dim, key.d_out // head_dim))
    taken = {layer.name for projections, _ in triples for layer in projections}
    plain = [layer for layer in layers if is_plain(layer) and layer.name not in taken]
    readers: dict[str, list[LinearLayer]] = {}
    for layer in plain:
        readers.setdefault(layer.input_name, []).append(layer)
    for group in readers.values():
        first = group[0]
        if len(group) == 1 and first.d_out == PACKED_PARTS * first.d_in:
            matches.refuse(first.name, "one fused Q|K|V projection (3× its input wide, as GPT-2's c_attn): "
                                       "heads are not cut in it yet")
    return matches


def find_attention_blocks(layers: list[LinearLayer], heads: int | None = None,
                          head_dims: dict[str, int] | None = None) -> list[AttentionBlock]:
    """The self-attentions `match_attention_blocks` finds."""
    return match_attention_blocks(layers, heads, head_dims).found


def match_plain_attention(graph: gs.Graph, layers: list[LinearLayer], num_heads: int = 0) -> Matches[AttentionBlock] | None:
    """`match_attention_blocks` with the head size each block's Q is reshaped into, else the model's head count
    (`num_heads`, e.g. --num-heads, which overrides both; or read from the graph); None when none can be told."""
    head_dims = {} if num_heads else reshaped_head_dims(graph, layers)
    geometry = None if num_heads or head_dims else attention_geometry(graph)
    heads = num_heads or (geometry[0] if geometry else 0)
    split = match_split_attention(graph, layers)
    if not (heads or head_dims or split):
        return None
    matches = match_attention_blocks(layers, heads or None, head_dims) if heads or head_dims else Matches()
    fused = {block.projections[0].name for block in split}
    matches.refused = [r for r in matches.refused if r.candidate not in fused]
    order = {layer.name: index for index, layer in enumerate(layers)}
    matches.found = sorted(matches.found + split, key=lambda block: order[block.projections[0].name])
    return matches


SCALING_OPS = {"Mul", "Div", "Cast"}  # what a projection's output may pass through before its heads are split
# (Whisper and BART scale Q by 1/√h_d first)


def head_reshapes(projected: gs.Tensor) -> list[gs.Node]:
    """The Reshapes that split a projection's output into heads: its consumers, or those of a scaling op after it."""
    found = []
    for node in projected.outputs:
        if node.op == "Reshape" and node.inputs[0] is projected:
            found.append(node)
        elif node.op in SCALING_OPS and len(node.outputs) == 1:
            found += [n for n in node.outputs[0].outputs if n.op == "Reshape" and n.inputs[0] is node.outputs[0]]
    return found


def reshaped_head_dims(graph: gs.Graph, layers: list[LinearLayer]) -> dict[str, int]:
    """The head size each layer's output is reshaped into ([b, s, heads, head size] with a constant head size, as
    torch's exporters write `view(b, s, -1, head_dim)`), by layer name; layers without such a Reshape are left out."""
    tensors = graph.tensors()
    found = {}
    for layer in layers:
        for consumer in head_reshapes(tensors[layer.output_name]) if layer.output_name in tensors else []:
            dims = reshape_target_dims(consumer)
            if dims and len(dims) == 4:
                heads, dim = dims[2], dims[3]
                if dim is not None and dim > 0 and layer.d_out % dim == 0:
                    found[layer.name] = dim
                elif heads is not None and heads > 0 and layer.d_out % heads == 0:
                    found[layer.name] = layer.d_out // heads
    return found


def find_fused_attention_blocks(graph: gs.Graph, layers: list[LinearLayer]) -> list[AttentionBlock]:
    """ONNX Runtime's fused self-attentions in model order: each Attention layer with a constant packed weight of
    three equal parts, followed by the plain layer that reads its output (the output projection)."""
    tensors = graph.tensors()
    blocks = []
    for layer in layers:
        if layer.pattern != "Attention" or layer.weight is None or layer.d_out % PACKED_PARTS:
            continue
        node = tensors[layer.output_name].inputs[0]
        heads = int(node.attrs.get("num_heads", 0))
        sizes = node.attrs.get("qkv_hidden_sizes")
        if not heads or (sizes and len(set(sizes)) != 1) or (layer.d_out // PACKED_PARTS) % heads:
            continue
        output = next((other for other in layers if other.input_name == layer.output_name and is_plain(other)), None)
        if output is not None and output.d_in == layer.d_out // PACKED_PARTS:
            blocks.append(AttentionBlock([layer], output, heads))
    return blocks


def prune_heads(graph: gs.Graph, block: AttentionBlock, kept_units: list[int], cut: NeuronCut) -> PassResult:
    """Keep the units `kept_units` of `block` (in place; key/value heads with their query heads, or heads); `cut`
    holds their context features and W_o's refit."""
    tensors = graph.tensors()
    scope = Scope(graph, f"{block.output.name}/heads")
    if block.split is not None:
        narrowed = [_narrow_split(scope, graph, block, len(kept_units), cut.keep)]
    elif block.packed:
        narrowed = [_narrow_packed(scope, tensors, block, len(kept_units), cut.keep)]
    else:
        narrowed = _narrow_projections(scope, graph, block, kept_units, cut.keep)
    if not block.packed:
        _narrow_head_axis(scope, graph, block, kept_units, narrowed)
    if not block.packed or block.split is not None:
        _resize_context(scope, tensors[block.output.input_name], block.width, len(cut.keep))
    dtype = block.output.dtype
    matmul, _ = matmul_and_add(tensors, block.output)
    set_weight(matmul, scope.constant("output/weight", cut.weight.astype(dtype)))
    set_bias(graph, block.output, scope.constant("output/bias", cut.bias.astype(dtype)))
    forget_shapes(graph, narrowed, {block.output.output_name})
    return committed(graph, heads_removed=(block.units - len(kept_units)) * block.group_size)


def _narrow_projections(scope: Scope, graph: gs.Graph, block: AttentionBlock, kept_units: list[int],
                        features: np.ndarray) -> list[gs.Tensor]:
    """Q keeps the columns `features` (the kept units' query heads); K and V keep the kept key/value heads'
    columns; the Reshapes that split and merge heads say how many are kept where they state a count."""
    tensors = graph.tensors()
    narrowed = [matmul_and_add(tensors, layer)[0].outputs[0] for layer in block.projections]
    kept = len(kept_units)
    for tag, layer, columns, heads in zip(("query", "key", "value"), block.projections,
                                          block.kept_columns(kept_units, features),
                                          ((block.heads, kept * block.group_size), (block.kv_heads, kept),
                                           (block.kv_heads, kept))):
        matmul, _ = matmul_and_add(tensors, layer)
        set_weight(matmul, scope.constant(f"{tag}/weight", np.asarray(layer.weight)[:, columns].astype(layer.dtype)))
        if layer.bias is not None:
            set_bias(graph, layer, scope.constant(f"{tag}/bias", np.asarray(layer.bias)[columns].astype(layer.dtype)))
        for consumer in head_reshapes(tensors[layer.output_name]):
            resize_shape_axis(scope, f"{tag}/shape", consumer, *heads, 2)
        if tag != "query" and block.group_size > 1:
            _resize_repeated_heads(scope, tag, tensors[layer.output_name], block, kept)
    return narrowed


SCORE_BIAS_OPS = {"Add", "Sub", "Mul"}  # a constant per-head term of the scores (Swin's relative position bias)


def _narrow_head_axis(scope: Scope, graph: gs.Graph, block: AttentionBlock, kept_units: list[int],
                      starts: list[gs.Tensor]) -> None:
    """Between the projections and the output projection, what states the head axis says the kept heads: a
    Reshape to […, H, N, d] with a constant head count (Swin's windows: [b·windows, H, N, h_d] and, for the
    shifted windows' mask, [b, windows, H, N, N]) and a constant
    per-head term of the scores ([…, H, N, N]: Swin's relative position bias, folded by the exporter) keeps the
    kept query heads' rows. Followed along the data path only (never into Shape's arithmetic), stopping at the
    context the output projection reads."""
    heads = np.concatenate([unit * block.group_size + np.arange(block.group_size) for unit in kept_units])
    kept = len(heads)
    frontier, seen, stop = list(starts), set(), block.output.input_name
    while frontier:
        tensor = frontier.pop()
        if tensor.name == stop:
            continue
        for node in tensor.outputs:
            if node.name in seen or node.op == "Shape" or (node.op == "Reshape" and node.inputs[0] is not tensor):
                continue
            seen.add(node.name)
            if node.op == "Reshape":
                dims = reshape_target_dims(node)
                if dims is not None and len(dims) >= 4 and dims[-3] == block.heads:
                    resize_shape_axis(scope, f"heads/shape{len(seen)}", node, block.heads, kept, -3)
            elif node.op in SCORE_BIAS_OPS:
                for index, term in enumerate(node.inputs):
                    if term is not tensor:
                        node.inputs[index] = _kept_head_rows(scope.child(f"term{len(seen)}"), term, block.heads,
                                                             heads)
            frontier += list(node.outputs)


TERM_DEPTH = 5  # how far back a scores term is searched for its per-head source
HEAD_TERM_OPS = SCORE_BIAS_OPS | {"Where", "Cast", "Unsqueeze", "Expand", "Identity", "Slice"}  # keep trailing axes
# (Slice: transformers 4's T5 cuts the bias to the query positions, position_bias[:, :, -seq:, :])


def _per_head_constant(term: gs.Tensor, heads: int, depth: int = TERM_DEPTH) -> bool:
    """`term` is, or is computed from, a per-head source within `depth` ops that keep the trailing axes: a constant
    with a head axis ([…, H, N, N]) or a table of H columns gathered and transposed to put them there (T5's
    relative position bias: Gather(table[buckets, H], ids[N, N]) → [N, N, H] → Transpose(2, 0, 1) → [H, N, N])."""
    value = constant_value(term)
    if value is not None:
        return value[0].ndim >= 3 and value[0].shape[-3] == heads
    producer = term.inputs[0] if len(term.inputs) == 1 else None
    if producer is None or depth == 0:
        return False
    if producer.op == "Transpose":
        return _transposed_table(producer, heads)
    return producer.op in HEAD_TERM_OPS and any(_per_head_constant(source, heads, depth - 1)
                                               for source in producer.inputs)


def _transposed_table(transpose: gs.Node, heads: int) -> bool:
    """`transpose` moves the columns of a gathered [rows, H] table to the head axis (-3)."""
    gathered = transpose.inputs[0]
    gather = gathered.inputs[0] if len(gathered.inputs) == 1 else None
    if gather is None or gather.op != "Gather" or gather.attrs.get("axis", 0) != 0:
        return False
    table, perm = constant_value(gather.inputs[0]), list(transpose.attrs.get("perm") or [])
    return (table is not None and table[0].ndim == 2 and table[0].shape[1] == heads and len(perm) >= 3
            and perm[-3] == len(perm) - 1)


def _kept_head_rows(scope: Scope, term: gs.Tensor, heads: int, kept: np.ndarray) -> gs.Tensor:
    """The kept heads' rows of a per-head scores term: a sliced copy of a constant, or a Gather on the head axis of
    a term computed from one (Swin's bias + shifted-window mask; its producer may be shared, so it stays whole)."""
    value = constant_value(term)
    if value is not None:
        if value[0].ndim >= 3 and value[0].shape[-3] == heads:
            return scope.constant("heads/score_term", np.take(value[0], kept, axis=-3))
        return term
    if not _per_head_constant(term, heads):
        return term
    return scope.op("Gather", "heads/score_rows", [term, scope.constant("heads/rows", kept.astype(np.int64))],
                    {"axis": -3})


CONTEXT_RESHAPES = 2  # Reshapes that merge the heads before the output projection reads them (GPT-2: 3-D, then 2-D)


def _resize_context(scope: Scope, context: gs.Tensor, width: int, kept_width: int) -> None:
    """The Reshapes that merge the heads into the context the output projection reads say its kept width where
    they state it."""
    for index in range(CONTEXT_RESHAPES):
        if not context.inputs or context.inputs[0].op != "Reshape":
            return
        reshape, name = context.inputs[0], "context/shape" + (str(index) if index else "")
        resize_shape_axis(scope, name, reshape, width, kept_width, -1)
        dims = reshape_target_dims(reshape)
        if dims is not None and dims[-1] is None and -1 not in dims:
            # the width read from the block's input at run time (CLIP: `reshape(b, t, embed_dim)` with embed_dim from
            # the hidden states' shape) would still be the full one: let Reshape infer the kept width instead
            resize_shape_axis(scope, name + "/inferred", reshape, None, -1, -1)
        context = reshape.inputs[0]


HEAD_LAYOUT_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Mul", "Add", "Sub", "Neg", "Slice",
                   "Concat", "Cast", "Identity"}  # what a key or value passes through before attention reads it


def _resize_repeated_heads(scope: Scope, tag: str, start: gs.Tensor, block: AttentionBlock, kept: int) -> None:
    """Grouped-query attention repeats each key/value head for its query heads (transformers' `repeat_kv`):
    Expand to [b, kv heads, group, s, d] then Reshape to [b, heads, s, d]. Where those counts are constants (torch's
    dynamo exporter writes them so), they say the kept counts: followed from the key or value projection through
    rotary and layout ops (never into attention's MatMul)."""
    frontier, seen = [start], set()
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if node.name in seen or node.op not in HEAD_LAYOUT_OPS:
                continue
            seen.add(node.name)
            if node.op == "Expand":
                resize_shape_axis(scope, f"{tag}/repeat", node, block.kv_heads, kept, 1)
            elif node.op == "Reshape":
                resize_shape_axis(scope, f"{tag}/repeated", node, block.heads, kept * block.group_size, 1)
            frontier += list(node.outputs)


def _packed_columns(block: AttentionBlock, features: np.ndarray) -> np.ndarray:
    """The columns of a packed Q|K|V weight that keep the context `features` in each of its three parts."""
    return np.concatenate([part * block.width + features for part in range(PACKED_PARTS)])


def _narrow_split(scope: Scope, graph: gs.Graph, block: AttentionBlock, kept: int, features: np.ndarray) -> gs.Tensor:
    """A fused Q|K|V projection cut in three by a Split (GPT-2's c_attn): it keeps the columns `features` of each
    part; the Reshapes before the Split, the Split's sizes and each part's head Reshape say the kept counts where
    they state them."""
    (layer,) = block.projections
    tensors = graph.tensors()
    node, _ = matmul_and_add(tensors, layer)
    columns = _packed_columns(block, features)
    set_weight(node, scope.constant("qkv/weight", np.asarray(layer.weight)[:, columns].astype(layer.dtype)))
    if layer.bias is not None:
        set_bias(graph, layer, scope.constant("qkv/bias", np.asarray(layer.bias)[columns].astype(layer.dtype)))
    split, reshapes = _split_of(tensors[layer.output_name], layer.d_out)
    for index, reshape in enumerate(reshapes):
        resize_shape_axis(scope, f"qkv/shape{index}", reshape, layer.d_out, PACKED_PARTS * len(features), -1)
    sizes = [len(features)] * PACKED_PARTS
    if len(split.inputs) > 1 and split.inputs[1].name:
        split.inputs[1] = scope.constant("qkv/split", np.asarray(sizes, np.int64))
    elif "split" in split.attrs:
        split.attrs["split"] = sizes
    for part in split.outputs:
        for consumer in part.outputs:
            if consumer.op == "Reshape":
                resize_shape_axis(scope, "part/shape", consumer, block.heads, kept, 2)
    return node.outputs[0]


SPLIT_RESHAPES = 2  # Reshapes between a fused projection and its Split (GPT-2: back to [b, s, 3d] from [tokens, 3d])


def _split_of(tensor: gs.Tensor, width: int) -> tuple[gs.Node | None, list[gs.Node]]:
    """The Split that cuts `tensor` (a projection's output, `width` wide) in three equal parts on its last axis,
    through Reshapes that keep that axis last, and those Reshapes; (None, []) when there is none."""
    reshapes: list[gs.Node] = []
    for _ in range(SPLIT_RESHAPES + 1):
        consumers = [node for node in tensor.outputs if node.op != "Shape"]
        if len(consumers) != 1:
            return None, []
        node = consumers[0]
        if node.op == "Reshape":
            dims = reshape_target_dims(node)
            if dims is None or dims[-1] not in (width, -1, None):
                return None, []
            reshapes.append(node)
            tensor = node.outputs[0]
            continue
        if node.op != "Split" or len(node.outputs) != PACKED_PARTS:
            return None, []
        given = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        sizes = given[0].tolist() if given is not None else node.attrs.get("split")
        rank = len(reshape_target_dims(reshapes[-1]) or []) if reshapes else 3  # a projection of [b, s, d] tokens
        last = node.attrs.get("axis", 0) in (-1, rank - 1)
        equal = sizes is None or list(sizes) == [width // PACKED_PARTS] * PACKED_PARTS
        return (node, reshapes) if last and equal and width % PACKED_PARTS == 0 else (None, [])
    return None, []


def match_split_attention(graph: gs.Graph, layers: list[LinearLayer]) -> list[AttentionBlock]:
    """Self-attentions with one fused Q|K|V projection cut in three by a Split (GPT-2's c_attn, torch's exporters),
    in model order: the head size is the one the query part is reshaped into ([b, s, heads, head size]); the output
    projection is the next sliceable layer reading a tensor of one part's width."""
    tensors = graph.tensors()
    sliceable = [layer for layer in layers if is_sliceable(layer)]
    blocks = []
    for index, layer in enumerate(sliceable):
        split, _ = _split_of(tensors[layer.output_name], layer.d_out)
        if split is None:
            continue
        width = layer.d_out // PACKED_PARTS
        head_dims = [dims[3] for node in split.outputs[0].outputs if node.op == "Reshape"
                     for dims in [reshape_target_dims(node)] if dims and len(dims) == 4 and dims[3] and dims[3] > 0]
        output = next((other for other in sliceable[index + 1:] if other.d_in == width
                       and other.input_name != layer.input_name), None)
        if head_dims and width % head_dims[0] == 0 and output is not None:
            blocks.append(AttentionBlock([layer], output, width // head_dims[0], split=split.name))
    return blocks


def _narrow_packed(scope: Scope, tensors, block: AttentionBlock, kept: int, features: np.ndarray) -> gs.Tensor:
    """The fused Attention keeps the columns `features` of each of its packed parts and says `kept` heads."""
    (layer,) = block.projections
    node = tensors[layer.output_name].inputs[0]
    columns = _packed_columns(block, features)
    node.inputs[1] = scope.constant("qkv/weight", np.asarray(layer.weight)[:, columns].astype(layer.dtype))
    if layer.bias is not None:
        node.inputs[2] = scope.constant("qkv/bias", np.asarray(layer.bias)[columns].astype(layer.dtype))
    node.attrs["num_heads"] = kept
    if node.attrs.get("qkv_hidden_sizes"):
        node.attrs["qkv_hidden_sizes"] = [len(features)] * PACKED_PARTS
    return node.outputs[0]
