"""The inspect stage: load a model and list its linear layers, eligible or with the reason they are skipped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import NoEligibleLayersError
from lrdeploy.weights import map_constants
from lrdeploy.onnx_io import LoadedModel, count_parameters, load_model
from lrdeploy.passes.linear_layers import LinearLayer, find_linear_layers
from lrdeploy.passes.drop_blocks import match_transformer_blocks
from lrdeploy.passes.merge_qkv import merged_qkv_model
from lrdeploy.passes.ort_fusion import fuse_for_onnxruntime
from lrdeploy.passes.prune_ffn import match_ffn_blocks
from lrdeploy.passes.prune_heads import match_attention_blocks, match_plain_attention


def branched_layers(graph: onnx.GraphProto) -> int:
    """MatMul/Gemm nodes inside the subgraphs of If/Loop/Scan nodes (at any depth)."""
    count = 0
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                count += sum(n.op_type in ("MatMul", "Gemm") for n in subgraph.node) + branched_layers(subgraph)
    return count


@dataclass
class Inspection:
    model: LoadedModel
    graph: gs.Graph
    layers: list[LinearLayer]
    model_params: int

    @property
    def eligible(self) -> list[LinearLayer]:
        return [layer for layer in self.layers if layer.eligible]

    def require_eligible(self) -> list[LinearLayer]:
        """The eligible layers, or NoEligibleLayersError saying why each layer was skipped."""
        eligible = self.eligible
        if not eligible and (branched := branched_layers(self.model.proto.graph)):
            raise NoEligibleLayersError(
                f"{self.model.path} keeps its {branched} MatMul/Gemm inside the branches of an If (a merged "
                "decoder, e.g. Optimum's decoder_model_merged.onnx), which lrdeploy does not rewrite; build "
                "decoder_model.onnx and decoder_with_past_model.onnx instead (optimum-cli export onnx --no-post-process "
                "writes them unmerged)")
        if not eligible:
            reasons = sorted({layer.reason for layer in self.layers})
            found = (f"{len(self.layers)} MatMul/Gemm found, all skipped: {'; '.join(reasons)}" if reasons
                     else "no MatMul/Gemm found")
            raise NoEligibleLayersError(
                f"{self.model.path} has no linear layer to compress ({found}); "
                "run `lrdeploy inspect` on it, or lower --rank-multiple for small layers"
            )
        return eligible

    def blocks(self) -> dict:
        """The transformer blocks the structured cuts find (FFNs, self-attentions, blocks that can be dropped) and
        every candidate they refused, with the reason."""
        ffn = match_ffn_blocks(self.graph, self.layers)
        attention = match_plain_attention(self.graph, self.layers) or match_attention_blocks(self.layers)
        depth = match_transformer_blocks(self.graph, attention.found, ffn.found)
        return {"ffn": len(ffn.found), "attention": len(attention.found), "droppable": len(depth.found),
                "refused": [{"part": part, "candidate": r.candidate, "reason": r.reason}
                            for part, matches in (("ffn", ffn), ("attention", attention), ("block", depth))
                            for r in matches.refused]}

    def to_dict(self) -> dict:
        eligible = self.eligible
        return {
            "model": str(self.model.path),
            "layers": [
                {"name": l.name, "pattern": l.pattern, "d_in": l.d_in, "d_out": l.d_out, "params": l.params,
                 "eligible": l.eligible, "reason": l.reason}
                for l in self.layers
            ],
            "totals": {
                "layers": len(self.layers),
                "eligible": len(eligible),
                "eligible_params": sum(l.params for l in eligible),
                "model_params": self.model_params,
                "in_branches": branched_layers(self.model.proto.graph),  # MatMul/Gemm inside If/Loop: not rewritten
            },
            "blocks": self.blocks(),
        }


def inspect_model(path: Path, rank_multiple: int = 16, map_weights: bool = False) -> Inspection:
    """`path` loaded and its linear layers found; `map_weights`: big external weights stay in their files."""
    return inspect_loaded(load_model(path, map_weights), rank_multiple)


def inspect_loaded(model: LoadedModel, rank_multiple: int = 16) -> Inspection:
    graph = gs.import_onnx(model.proto)
    if model.weights is not None:
        map_constants(graph, model.weights)
    return Inspection(model, graph, find_linear_layers(graph, rank_multiple), count_parameters(model.proto))


def inspect_fused(inspection: Inspection, rank_multiple: int, num_heads: int = 0, hidden_size: int = 0) -> Inspection:
    """The model as ONNX Runtime's transformer optimizer fuses it, inspected (its file and external data stay
    the original's: that is what is read, hashed for the cache, and compared against)."""
    fused = fuse_for_onnxruntime(inspection.model.proto, num_heads, hidden_size)
    return inspect_loaded(LoadedModel(fused, inspection.model.path, inspection.model.external_files), rank_multiple)


def inspect_merged_qkv(inspection: Inspection, rank_multiple: int) -> Inspection:
    """The model with each self-attention's Q, K, V merged into one layer (`--qkv joint`), inspected; file and
    external data stay the original's, as for `inspect_fused`."""
    merged = merged_qkv_model(inspection.graph, inspection.layers)
    return inspect_loaded(LoadedModel(merged, inspection.model.path, inspection.model.external_files), rank_multiple)
