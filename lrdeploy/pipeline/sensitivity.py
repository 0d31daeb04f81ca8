"""Sensitivity allocation: how much the model's outputs degrade when each layer alone is cut to a rank.

One augmented model serves every measurement. For each eligible layer L it gets two extra inputs, a weight
error D_L [d_in, d_out] and a bias error e_L [d_out], added to the layer's output:

    X_L ─MatMul(W)─Add(b)─► Y_L      ⇒      Y_L + X_L·D_L + e_L

Cutting L alone to rank k is exactly D_L = A_k·B_k − W, e_L = c_k − b (its input is unchanged, since only L
is cut); every other layer gets zeros. Degradation is 1 − cosine per sample against the dense outputs,
averaged over samples and outputs, on a few calibration batches. Layers are measured at a few ranks and
interpolated along their spectrum (linearly in discarded energy); the allocation is the greedy knapsack of
`lowrank.allocate.greedy_ranks` on those curves.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.allocate import LayerShape, discarded_fraction
from lrdeploy.lowrank.decompose import Decomposition
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.pipeline.validate import per_sample_cosine
from lrdeploy.runtime.onnxruntime import create_session

SensitivityTable = dict[str, dict[int, float]]
GROUP_SIZE = 6


def candidate_ranks(shape: LayerShape, multiple: int, count: int = 3) -> list[int]:
    """`count` ranks spread from one multiple to just under the break-even rank, snapped to the multiple."""
    top = max(multiple, int((shape.dense_params / (shape.d_in + shape.d_out) - 1) // multiple) * multiple)
    ranks = {max(multiple, int(round(f * top / multiple)) * multiple) for f in np.linspace(0, 1, count)}
    return sorted(k for k in ranks if shape.saves(k))


def _injected_model(model: onnx.ModelProto, layers: list[LinearLayer]) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for index, layer in enumerate(layers):
        y = tensors[layer.output_name]
        x = tensors[layer.input_name]
        delta_w = gs.Variable(f"lrdeploy_sens/{index}/dw", dtype=layer.dtype, shape=[layer.d_in, layer.d_out])
        delta_b = gs.Variable(f"lrdeploy_sens/{index}/db", dtype=layer.dtype, shape=[layer.d_out])
        graph.inputs += [delta_w, delta_b]
        original = gs.Variable(f"lrdeploy_sens/{index}/y", dtype=y.dtype)
        for producer in list(y.inputs):
            producer.outputs = [original if t is y else t for t in producer.outputs]
        error = graph.layer(op="MatMul", inputs=[x, delta_w], outputs=[f"lrdeploy_sens/{index}/xdw"])[0]
        error = graph.layer(op="Add", inputs=[error, delta_b], outputs=[f"lrdeploy_sens/{index}/err"])[0]
        graph.layer(op="Add", inputs=[original, error], outputs=[y])
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)


def _degradation(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """Mean over outputs of mean over samples of 1 − cosine."""
    losses = []
    for ref_batches, out_batches in zip(zip(*reference), zip(*outputs)):
        cosines = np.concatenate([per_sample_cosine(r, o) for r, o in zip(ref_batches, out_batches)])
        losses.append(1.0 - float(np.mean(cosines)))
    return float(np.mean(losses))


def measure_sensitivity(
    model: onnx.ModelProto, layers: list[LinearLayer], decompositions: dict[str, Decomposition], multiple: int,
    batches: Iterable[dict[str, np.ndarray]], threads: int = 0, on_step: Callable[[], None] | None = None,
    group_size: int = GROUP_SIZE,
) -> SensitivityTable:
    """Degradation of the outputs when each layer alone is cut to each of its candidate ranks.

    Layers are injected `group_size` at a time: each injection adds one dense-sized MatMul to every run, so
    small groups keep runs cheap while few groups keep session creation cheap.
    """
    feeds = list(batches)
    reference = [create_session(model, threads).run(None, feed) for feed in feeds]
    table: SensitivityTable = {}
    for start in range(0, len(layers), group_size):
        group = layers[start:start + group_size]
        session = create_session(_injected_model(model, group), threads)
        zeros = {}
        for index, layer in enumerate(group):
            zeros[f"lrdeploy_sens/{index}/dw"] = np.zeros((layer.d_in, layer.d_out), layer.dtype)
            zeros[f"lrdeploy_sens/{index}/db"] = np.zeros(layer.d_out, layer.dtype)
        for index, layer in enumerate(group):
            table[layer.name] = {}
            bias = np.zeros(layer.d_out) if layer.bias is None else np.asarray(layer.bias, np.float64)
            for rank in candidate_ranks(layer.shape, multiple):
                factors = decompositions[layer.name].factors(rank)
                delta_w = (factors.dense_weight() - np.asarray(layer.weight, np.float64)).astype(layer.dtype)
                delta_b = ((0 if factors.bias is None else factors.bias) - bias).astype(layer.dtype)
                extra = {f"lrdeploy_sens/{index}/dw": delta_w, f"lrdeploy_sens/{index}/db": delta_b}
                outputs = [session.run(None, {**feed, **zeros, **extra}) for feed in feeds]
                table[layer.name][rank] = _degradation(reference, outputs)
                if on_step is not None:
                    on_step()
    return table


def sensitivity_loss(table: SensitivityTable, energies: dict[str, np.ndarray]) -> Callable[[LayerShape, int | None], float]:
    """A loss curve per layer: measured degradation, interpolated between measured ranks linearly in the
    normalized energy the truncation discards (0 loss when dense or when nothing is discarded)."""
    def discarded(name: str, rank: int) -> float:
        return discarded_fraction(energies[name], rank)

    def loss(shape: LayerShape, rank: int | None) -> float:
        if rank is None:
            return 0.0
        points = table[shape.name]
        xs = [0.0] + [discarded(shape.name, k) for k in sorted(points, reverse=True)]
        ys = [0.0] + [points[k] for k in sorted(points, reverse=True)]
        order = np.argsort(xs)
        return float(np.interp(discarded(shape.name, rank), np.asarray(xs)[order], np.asarray(ys)[order]))

    return loss


def count_measurements(layers: list[LinearLayer], multiple: int) -> int:
    return sum(len(candidate_ranks(layer.shape, multiple)) for layer in layers)
