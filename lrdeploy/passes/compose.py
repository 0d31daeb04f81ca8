"""The compressed model: structured cuts first (FFN neurons, attention heads: anything with an `apply(graph)`),
then the chosen layers split (`factorize`), in one graph built from the original (which is not changed)."""

from __future__ import annotations

from typing import Mapping, Protocol

import onnx
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.decompose import LowRankFactors
from lrdeploy.passes.factorize import factorize_layers
from lrdeploy.passes.linear_layers import LinearLayer


class GraphCut(Protocol):
    def apply(self, graph: gs.Graph) -> None:
        """Rewrite `graph` in place."""


def compressed_model(original: onnx.ModelProto, layers: list[LinearLayer], factors: Mapping[str, LowRankFactors],
                     cuts: GraphCut | None = None) -> onnx.ModelProto:
    graph = gs.import_onnx(original)
    if cuts is not None:
        cuts.apply(graph)
    factorize_layers(graph, layers, factors)
    return gs.export_onnx(graph)
