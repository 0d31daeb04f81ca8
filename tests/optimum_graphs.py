"""The Optimum-exported graphs of tests/data/optimum/ made runnable: stripped weights filled with seeded random
values, chosen heads silenced, and random inputs named and shaped as each graph's inputs ask."""

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from lrdeploy.passes.layer_nodes import matmul_and_add
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.passes.prune_ffn import find_ffn_blocks
from lrdeploy.passes.prune_heads import match_plain_attention

FIXTURES = Path(__file__).parent / "data" / "optimum"
STRIPPED = 16  # as benchmarks/tools/optimum_exports.py strips them


def optimum_graph(name: str, target: Path, seed: int = 0, silence_half_heads: bool = False,
                  silence_half_neurons: bool = False) -> Path:
    """tests/data/optimum/`name` with random weights (×0.2) saved to `target`; with `silence_half_heads`, the
    second half of every self-attention's heads (with grouped-query attention: of its key/value groups) write
    nothing; with `silence_half_neurons`, the second half of every FFN's neurons (their rows of the output
    projection zeroed)."""
    model = onnx.load(str(FIXTURES / name))
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind == "f" and values.size >= STRIPPED:
            random = (0.2 * rng.standard_normal(values.shape)).astype(values.dtype)
            tensor.CopyFrom(numpy_helper.from_array(random, tensor.name))
    graph = gs.import_onnx(model)
    layers = find_linear_layers(graph)
    silenced = []
    if silence_half_heads:
        silenced += [(block.output, block.width // 2) for block in match_plain_attention(graph, layers).found]
    if silence_half_neurons:
        silenced += [(block.down, block.width // 2) for block in find_ffn_blocks(graph, layers)]
    weights, tensors = {t.name: t for t in model.graph.initializer}, graph.tensors()
    for layer, first_silent_row in silenced:
        weight = weights[matmul_and_add(tensors, layer)[0].inputs[1].name]
        values = numpy_helper.to_array(weight).copy()
        values[first_silent_row:] = 0
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(target))
    return target


def graph_inputs(model: Path, count: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs by the graph's input names and shapes: token ids (positions 0–15), masks of ones, 32×32 pixels,
    audio features
    and encoder states (16 positions where the length is free), an empty decoder past (prefill), the encoder's past
    and `use_cache_branch` False (a merged decoder's first step)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in onnx.load(str(model), load_external_data=False).graph.input:
        name = spec.name
        dims = [d.dim_value or None for d in spec.type.tensor_type.shape.dim]
        if name == "token_type_ids":
            inputs[name] = np.zeros((count, 16), np.int64)
        elif name == "position_ids":
            inputs[name] = np.tile(np.arange(16, dtype=np.int64), (count, 1))
        elif name.endswith("ids"):
            inputs[name] = rng.integers(3, 512, (count, 16), dtype=np.int64)
        elif name.endswith("mask"):
            inputs[name] = np.ones((count, 16), np.int64)
        elif name == "pixel_values":
            inputs[name] = rng.standard_normal((count, 3, 32, 32)).astype(np.float32)
        elif name == "use_cache_branch":
            inputs[name] = np.zeros([1], bool)
        elif name.startswith("past_key_values") and ".encoder." not in name:  # a decoder's own past: prefill
            inputs[name] = np.zeros([count, dims[1], 0, dims[3]], np.float32)
        else:  # input_features, encoder_hidden_states, the encoder's past: float, 16 where a length is free
            inputs[name] = rng.standard_normal([count] + [d or 16 for d in dims[1:]]).astype(np.float32)
    return inputs
