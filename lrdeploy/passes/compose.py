"""The compressed model, built in one graph from the original (which is not changed): structured cuts first
(`StructuredCuts`: FFN neurons, attention heads, value widths, dropped blocks), then the chosen layers split
(`factorize`). This is the one executor of a plan: whatever chose the cuts and ranks, this applies them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.decompose import LowRankFactors
from lrdeploy.lowrank.neurons import NeuronCut
from lrdeploy.lowrank.value_heads import ValueCut
from lrdeploy.passes.drop_blocks import TransformerBlock, drop_block
from lrdeploy.passes.factorize import factorize_layers
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.prune_ffn import FfnBlock, prune_block
from lrdeploy.passes.prune_heads import AttentionBlock, prune_heads
from lrdeploy.passes.shrink_values import shrink_values


@dataclass
class StructuredCuts:
    """The cuts chosen for one model; `apply` rewrites a graph with them."""

    ffn: list[tuple[FfnBlock, NeuronCut]] = field(default_factory=list)
    heads: list[tuple[AttentionBlock, list[int], NeuronCut]] = field(default_factory=list)
    dropped: list[tuple[TransformerBlock, list[LinearLayer], float]] = field(default_factory=list)
    values: list[tuple[AttentionBlock, ValueCut]] = field(default_factory=list)
    source: str = ""  # what chose them, for the report: "" = the options --ffn-keep, --heads-keep, --drop-blocks
    sources: dict[str, str] = field(default_factory=dict)  # a kind merged from cuts chosen otherwise: its source

    def merge(self, other: "StructuredCuts") -> None:
        """Add `other`'s cuts; a kind they bring keeps `other`'s source (a constrained plan: the FFN widths fixed
        by --ffn-keep, the heads chosen by the unified plan)."""
        for kind in ("ffn", "heads", "dropped", "values"):
            label = other.sources.get(kind, other.source)
            if getattr(other, kind) and label != self.source:
                self.sources[kind] = label
        self.ffn += other.ffn
        self.heads += other.heads
        self.dropped += other.dropped
        self.values += other.values

    def _source(self, kind: str, option: str) -> str:
        return self.sources.get(kind, self.source) or option

    def applied_to(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A new model: `model` with these cuts (`model` itself is not changed)."""
        graph = gs.import_onnx(model)
        self.apply(graph)
        return gs.export_onnx(graph.cleanup().toposort())

    def apply(self, graph: gs.Graph) -> None:
        for block, cut in self.ffn:
            prune_block(graph, block, cut)
        for attention, kept, cut in self.heads:
            prune_heads(graph, attention, kept, cut)
        for attention, value_cut in self.values:
            shrink_values(graph, attention, value_cut)
        for block, _, _ in self.dropped:
            drop_block(graph, block)

    def refit_targets(self) -> dict[str, tuple[LinearLayer, int]]:
        """{name: (layer, input width after the cut)} of the projections these cuts re-solved from dense moments
        (an FFN's down, a self-attention's output): what a refit toward the original outputs solves again."""
        targets = {block.down.name: (block.down, len(cut.keep)) for block, cut in self.ffn}
        targets |= {attention.output.name: (attention.output, len(cut.keep)) for attention, _, cut in self.heads}
        return targets | {attention.output.name: (attention.output, cut.output_weight.shape[0])
                          for attention, cut in self.values}

    def with_refit(self, layer_name: str, weight: np.ndarray, bias: np.ndarray) -> "StructuredCuts":
        """A copy with the projection `layer_name` (one of `refit_targets`) given a new weight and bias."""
        def refit(layer: LinearLayer, cut):
            if layer.name != layer_name:
                return cut
            if isinstance(cut, ValueCut):
                return dataclasses.replace(cut, output_weight=weight, output_bias=bias)
            return dataclasses.replace(cut, weight=weight, bias=bias)

        return dataclasses.replace(
            self, ffn=[(block, refit(block.down, cut)) for block, cut in self.ffn],
            heads=[(attention, kept, refit(attention.output, cut)) for attention, kept, cut in self.heads],
            values=[(attention, refit(attention.output, cut)) for attention, cut in self.values],
            dropped=list(self.dropped))

    def records(self) -> dict[str, tuple[str, int]]:
        """{layer cut: (what was kept, weight parameters after)}."""
        result = {}
        for block, layers, distortion in self.dropped:
            for layer in layers:
                result[layer.name] = (f"{block.name} dropped ({self._source('dropped', '--drop-blocks')}; alone it distorts "
                                      f"the outputs by {distortion:.4f})", 0)
        for block, cut in self.ffn:
            kept = len(cut.keep)
            why = f"{kept} of {block.width} FFN neurons kept ({self._source('ffn', '--ffn-keep')})"
            for layer in block.widening:
                result[layer.name] = (why, layer.d_in * kept)
            result[block.down.name] = (why, kept * block.down.d_out)
        for attention, heads, cut in self.heads:
            width = len(cut.keep)
            why = f"{attention.describe(len(heads))} kept ({self._source('heads', '--heads-keep')})"
            for layer, kept_width in zip(attention.projections, attention.projection_widths(width)):
                result[layer.name] = (why, layer.d_in * kept_width)
            result[attention.output.name] = (why, width * attention.output.d_out)
        for attention, value_cut in self.values:
            width = value_cut.value_weight.shape[1]
            why = (f"value heads {value_cut.rank} of {attention.head_dim} wide ({self._source('values', '--values-keep')}; "
                   f"{value_cut.lost_energy:.1%} of their output energy left out)")
            value = attention.projections[-1]
            result[value.name] = (why, value.d_in * width)
            result[attention.output.name] = (why, width * attention.output.d_out)
        return result


    def params(self, layers: list[LinearLayer]) -> tuple[int, int]:
        """Weight parameters of the layers these cuts change (among `layers`): before and after."""
        after = self.records()
        return (sum(layer.params for layer in layers if layer.name in after),
                sum(kept for _, kept in after.values()))


def compressed_model(original: onnx.ModelProto, layers: list[LinearLayer], factors: Mapping[str, LowRankFactors],
                     cuts: StructuredCuts | None = None,
                     before_export: Callable[[gs.Graph], None] | None = None) -> onnx.ModelProto:
    """`original` with `cuts` applied and `layers` split into `factors`. `before_export`: what the caller does to
    the rewritten graph before it becomes a proto (`weights_out.write_constants_out`: its weights written out)."""
    graph = gs.import_onnx(original)
    if cuts is not None:
        cuts.apply(graph)
    factorize_layers(graph, layers, factors)
    if before_export is not None:
        before_export(graph)
    return gs.export_onnx(graph)
