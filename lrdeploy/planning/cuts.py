"""Structured cuts of a build: FFN blocks narrowed (`--ffn-keep`) and attention heads removed (`--heads-keep`),
chosen from calibration moments with the layers after them refit (`lowrank.neurons`), every head's value/output
width narrowed (`--values-keep`, `lowrank.value_heads`), and whole blocks dropped
(`--drop-blocks N`: the N whose removal alone distorts the outputs least on a few calibration batches). The
layers they cut leave the low-rank candidates; `--rank-budget` applies to the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from lrdeploy.calib.data import Feeds, SampleSet
from lrdeploy.calib.stats import TensorRequest
from lrdeploy.errors import NoEligibleLayersError, OptionError
from lrdeploy.lowrank.moments import Moments
from lrdeploy.lowrank.neurons import cut_groups, cut_neurons
from lrdeploy.lowrank.value_heads import shrink_value_heads
from lrdeploy.passes.drop_blocks import TransformerBlock, match_transformer_blocks
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.prune_ffn import FfnBlock, find_ffn_blocks
from lrdeploy.passes.compose import StructuredCuts
from lrdeploy.passes.prune_heads import AttentionBlock, find_qkv_triples, match_plain_attention
from lrdeploy.planning.blocks import self_attentions
from lrdeploy.settings.build import BuildConfig
from lrdeploy.stages.inspect import Inspection
from lrdeploy.stages.block_reach import dropped_block_losses


def kept_count(total: int, keep: float, step: int) -> int:
    """How many of `total` units a fraction `keep` keeps, rounded to `step` (at least one step)."""
    return min(total, max(step, int(round(total * keep / step)) * step))


def splittable(config: BuildConfig, inspection: Inspection, eligible: list[LinearLayer]) -> list[LinearLayer]:
    """The eligible layers that may be split: all of them, or with `config.factorization.splits == "ffn"` the FFN blocks' up and
    down projections only (a student exported plain and fused again keeps every Attention fusion)."""
    if config.factorization.splits == "any":
        return eligible
    blocks = find_ffn_blocks(inspection.graph, inspection.layers)
    ffn = {layer.name for block in blocks for layer in block.layers}
    return [layer for layer in eligible if layer.name in ffn]


@dataclass
class StructuredBlocks:
    """The blocks the configured cuts apply to, found before calibration."""

    ffn: list[FfnBlock]
    attention: list[AttentionBlock]
    dropped: list[tuple[TransformerBlock, list[LinearLayer], float]] = field(default_factory=list)
    depth_candidates: list[AttentionBlock] = field(default_factory=list)  # the self-attentions that start blocks
    values: list[AttentionBlock] = field(default_factory=list)  # the self-attentions whose value heads narrow

    @classmethod
    def find(cls, config: BuildConfig, inspection: Inspection) -> "StructuredBlocks":
        ffn = find_ffn_blocks(inspection.graph, inspection.layers) if config.cuts.ffn_keep else []
        if config.cuts.ffn_keep and not ffn:
            raise NoEligibleLayersError(f"{config.model} has no FFN block (MatMul, per-neuron activation, MatMul) "
                                        "for --ffn-keep; leave the option out")
        attention = []
        if config.cuts.heads_keep or config.cuts.drop_blocks or config.cuts.values_keep:
            attention = self_attentions(config, inspection.graph, inspection.layers)
            if attention is None and not find_qkv_triples(inspection.layers):
                attention = []  # no self-attention at all: said below, not a question of the head count
            if attention is None:
                raise OptionError("cannot tell the attention head count from the graph; give it with --num-heads")
            if not attention:
                option = ("--heads-keep" if config.cuts.heads_keep else "--drop-blocks" if config.cuts.drop_blocks
                          else "--values-keep")
                form = ("a fused Attention followed by its output MatMul" if config.optimize == "ort" else
                        "Q, K, V and output projections as plain MatMuls")
                matches = None if config.optimize == "ort" else match_plain_attention(
                    inspection.graph, inspection.layers, config.num_heads)
                refused = "".join(f"; {r.candidate}: {r.reason}" for r in (matches.refused if matches else [])[:2])
                raise NoEligibleLayersError(f"{config.model} has no self-attention block ({form}{refused}) for "
                                            f"{option}; leave the option out")
        if config.cuts.heads_keep and any(block.feeds_cache for block in attention):
            raise OptionError("--heads-keep would change the head count of the model's KV cache (its past_key_values "
                              "inputs and present outputs), which a generation loop feeds back; build the model "
                              "exported without its cache (export --task text-generation; Optimum's task without -with-past) or "
                              "leave --heads-keep out")
        grouped = [block for block in attention if block.kv_heads != block.heads]
        if config.cuts.values_keep and grouped:
            raise OptionError(f"--values-keep cannot narrow grouped-query attention ({grouped[0].heads} query heads "
                              f"share {grouped[0].kv_heads} value heads: a value head's width serves several query "
                              "heads); leave it out, or cut whole key/value heads with --heads-keep")
        return cls(ffn, attention if config.cuts.heads_keep else [], [], attention if config.cuts.drop_blocks else [],
                   attention if config.cuts.values_keep else [])

    def choose_drops(self, config: BuildConfig, inspection: Inspection, probe: SampleSet, feeds: Feeds) -> None:
        """Measure each block dropped alone on `probe` and keep the `config.cuts.drop_blocks` least harmful drops."""
        graph = inspection.graph
        ffn = find_ffn_blocks(graph, inspection.layers)
        matches = match_transformer_blocks(graph, self.depth_candidates, ffn)
        blocks = matches.found
        refused = "; ".join(f"{r.candidate}: {r.reason}" for r in matches.refused[:2])
        if not blocks:
            raise NoEligibleLayersError(f"{config.model} has no block to drop ({refused}); leave --drop-blocks out")
        if config.cuts.drop_blocks >= len(blocks) + len(matches.refused):
            raise OptionError(f"--drop-blocks {config.cuts.drop_blocks} would drop all {len(blocks)} blocks found; "
                              "drop fewer")
        if config.cuts.drop_blocks > len(blocks):
            raise OptionError(f"--drop-blocks {config.cuts.drop_blocks}: only {len(blocks)} of the "
                              f"{len(blocks) + len(matches.refused)} blocks can be dropped ({refused}); drop fewer")
        distortion = dropped_block_losses(inspection.model.proto, blocks, feeds.batches(probe), config.threads,
                                          feeds.mask_name)
        order = [layer.name for layer in inspection.layers]
        starts = [order.index(a.projections[0].name) for a in self.depth_candidates] + [len(order)]
        for block in sorted(blocks, key=lambda b: distortion[b.name])[:config.cuts.drop_blocks]:
            inside = inspection.layers[starts[block.index]:starts[block.index + 1]]
            self.dropped.append((block, block.weighted_layers(inside), distortion[block.name]))

    @property
    def layer_names(self) -> set[str]:
        names = {layer.name for block in self.ffn for layer in block.layers}
        names |= {layer.name for _, layers, _ in self.dropped for layer in layers}
        names |= {layer.name for block in self.values for layer in (block.projections[-1], block.output)}
        return names | {layer.name for block in self.attention for layer in (*block.projections, block.output)}

    def remaining(self, eligible: list[LinearLayer], budgets: tuple[float, ...]) -> list[LinearLayer]:
        """The low-rank candidates these cuts leave (none is fine when no budget asks for a split)."""
        rest = [layer for layer in eligible if layer.name not in self.layer_names]
        if eligible and not rest and any(budget < 1.0 for budget in budgets):
            raise NoEligibleLayersError("--ffn-keep/--heads-keep cut every layer that may be split (`distill --optimize "
                                        "ort` splits FFN layers only), so no layer is left for --rank-budget below 1; "
                                        "pass --rank-budget 1, or cut less")
        return rest

    def requests(self) -> list[TensorRequest]:
        """The tensors whose moments the cuts need: FFN activations, attention contexts."""
        return ([TensorRequest(block.down.input_name, block.width) for block in self.ffn]
                + [TensorRequest(block.output.input_name, block.output.d_in) for block in self.attention + self.values])

    def _kept(self, blocks: list, layers_of) -> list:
        """The blocks outside every dropped block (a dropped block is gone: nothing of it is cut or reported)."""
        dropped = {layer.name for _, layers, _ in self.dropped for layer in layers}
        return [block for block in blocks if not any(layer.name in dropped for layer in layers_of(block))]

    def cut(self, config: BuildConfig, moments: dict[str, Moments]) -> StructuredCuts:
        """The cuts of the blocks that stay, from calibration `moments` (blocks to drop are chosen before)."""
        cuts = StructuredCuts(dropped=self.dropped)
        attention_layers = lambda block: (*block.projections, block.output)  # noqa: E731
        for block in self._kept(self.ffn, lambda block: block.layers):
            count = kept_count(block.width, config.cuts.ffn_keep, config.factorization.rank_multiple)
            cuts.ffn.append((block, cut_neurons(moments[block.down.input_name], block.down.weight, block.down.bias,
                                                count)))
        for block in self._kept(self.attention, attention_layers):
            heads, cut = cut_groups(moments[block.output.input_name], block.output.weight, block.output.bias,
                                    block.units, kept_count(block.units, config.cuts.heads_keep, 1))
            cuts.heads.append((block, heads, cut))
        for block in self._kept(self.values, attention_layers):
            value = block.projections[-1]
            cuts.values.append((block, shrink_value_heads(moments[block.output.input_name], value.weight, value.bias,
                                                          block.output.weight, block.output.bias, block.heads,
                                                          kept_count(block.head_dim, config.cuts.values_keep, 1))))
        return cuts
