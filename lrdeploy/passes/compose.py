"""The compressed model: FFN blocks narrowed (`prune_ffn`), then the chosen layers split (`factorize`), in one
graph built from the original (which is not changed)."""

from __future__ import annotations

from typing import Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.decompose import LowRankFactors
from lrdeploy.lowrank.neurons import NeuronCut
from lrdeploy.passes.factorize import factorize_layers
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.prune_ffn import FfnBlock, prune_block


def compressed_model(original: onnx.ModelProto, layers: list[LinearLayer], factors: Mapping[str, LowRankFactors],
                     narrowed: Sequence[tuple[FfnBlock, NeuronCut]] = ()) -> onnx.ModelProto:
    graph = gs.import_onnx(original)
    for block, cut in narrowed:
        prune_block(graph, block, cut)
    factorize_layers(graph, layers, factors)
    return gs.export_onnx(graph)
