"""compress(model, calib_batches, rank_budget, ...): feature PCA (or svd/whiten) on a PyTorch model's
nn.Linear layers, using the same moments, decompositions and allocation as the ONNX path.

Inputs of every nn.Linear are collected with forward hooks into float64 moments (padding excluded when the
batches carry an attention mask), then each chosen layer is replaced by a LowRankLinear.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from lrdeploy.errors import ModelLoadError, NoEligibleLayersError, OptionError
from lrdeploy.lowrank.allocate import LayerShape, RankPlan, allocate
from lrdeploy.lowrank.decompose import LowRankFactors, decompose
from lrdeploy.lowrank.moments import Moments
from lrdeploy.torch.lowrank_linear import LowRankLinear

Batch = Mapping[str, torch.Tensor]


@dataclass
class CompressionResult:
    model: torch.nn.Module
    plan: RankPlan
    shapes: list[LayerShape]


def linear_layers(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.nn.Linear]:
    """Named nn.Linear modules of `model`, minus names matching any `exclude` glob."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(fnmatch.fnmatch(name, p) for p in exclude)}


@torch.no_grad()
def collect_input_moments(model: torch.nn.Module, layers: dict[str, torch.nn.Linear], batches: Iterable[Batch],
                          mask_key: str = "attention_mask") -> dict[str, Moments]:
    """Σx and Σxxᵀ of every layer's input over the batches (rows where the batch's mask is 0 are skipped)."""
    moments = {name: Moments.zeros(layer.in_features) for name, layer in layers.items()}
    current_mask: list[torch.Tensor | None] = [None]

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().to(torch.float64)
            mask = current_mask[0]
            rows = x.reshape(-1, x.shape[-1])
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                rows = rows[mask.reshape(-1).bool()]
            moments[name] = moments[name].add(rows.shape[0], rows.sum(0).numpy(), (rows.T @ rows).numpy())
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        model.eval()
        for batch in batches:
            current_mask[0] = batch.get(mask_key)
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: m for name, m in moments.items() if m.count > 0}


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def compress(model: torch.nn.Module, calib_batches: Iterable[Batch], rank_budget: float, method: str = "pca",
             allocation: str = "uniform", rank_multiple: int = 16, exclude: tuple[str, ...] = ()) -> CompressionResult:
    """Replace the model's nn.Linear layers (in place) by LowRankLinear under `rank_budget`.

    Layers never reached by the calibration batches (e.g. an unused pooler) and layers too small to save
    parameters at `rank_multiple` stay as they are.
    """
    if allocation == "sensitivity":
        raise OptionError("sensitivity allocation runs on the ONNX path: use `lrdeploy distill --allocation "
                          "sensitivity`, or build on the exported model and pass its factors to apply_factors()")
    candidates = linear_layers(model, exclude)
    batches = list(calib_batches)
    moments = collect_input_moments(model, candidates, batches)
    layers = {n: l for n, l in candidates.items() if n in moments
              and LayerShape(n, l.in_features, l.out_features).saves(rank_multiple)}
    if not layers:
        raise NoEligibleLayersError("no nn.Linear layer to compress (none reached by the calibration batches, or all too small)")
    shapes = [LayerShape(n, l.in_features, l.out_features) for n, l in layers.items()]
    decompositions = {}
    for name, layer in layers.items():
        weight = layer.weight.detach().to(torch.float64).numpy().T  # row convention [d_in, d_out]
        bias = None if layer.bias is None else layer.bias.detach().to(torch.float64).numpy()
        decompositions[name] = decompose(method, weight, bias, moments[name])
    plan = allocate(allocation, shapes, rank_budget, rank_multiple, {n: d.energies for n, d in decompositions.items()})
    for name, rank in plan.items():
        if rank is not None:
            dtype = layers[name].weight.dtype
            _replace(model, name, LowRankLinear.from_factors(decompositions[name].factors(rank), dtype))
    return CompressionResult(model, plan, shapes)


def _weight_key(weight: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return weight.shape, hashlib.sha1(np.ascontiguousarray(weight, dtype=np.float32).tobytes()).digest()


def apply_factors(model: torch.nn.Module, factors_by_weight: Mapping[str, tuple[np.ndarray, LowRankFactors]],
                  exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Replace (in place) each nn.Linear whose weight equals one of the given row-convention weights [d_in, d_out]
    by a LowRankLinear holding that weight's factors; returns {module name: rank}.

    This is how factors chosen on the ONNX path (sensitivity allocation, refit) reach a PyTorch model exported
    from the same weights: ONNX layer names and module names differ, the weights do not. A weight that
    matches no module, or more than one, is an error.
    """
    find = module_by_weight(model, exclude)
    applied = {}
    for layer_name, (weight, layer_factors) in factors_by_weight.items():
        name = find(layer_name, weight)
        dtype = model.get_submodule(name).weight.dtype
        _replace(model, name, LowRankLinear.from_factors(layer_factors, dtype))
        applied[name] = layer_factors.rank
    return applied


def module_by_weight(model: torch.nn.Module, exclude: tuple[str, ...] = ()):
    """A lookup `(layer name, row-convention weight [d_in, d_out]) -> nn.Linear module name`: ONNX layer names and
    module names differ, the weights do not. A weight that matches no module, or more than one, is an error
    (with `required=False`, no match gives None)."""
    by_key: dict[tuple, list[str]] = {}
    for name, layer in linear_layers(model, exclude).items():
        by_key.setdefault(_weight_key(layer.weight.detach().cpu().numpy().T), []).append(name)

    def find(layer_name: str, weight: np.ndarray, required: bool = True) -> str | None:
        matches = by_key.get(_weight_key(weight), [])
        if not matches and not required:
            return None
        if len(matches) != 1:
            raise ModelLoadError(f"layer {layer_name}: {len(matches)} nn.Linear modules carry its weight (need exactly "
                                 "one); compress the model the factors were computed from")
        return matches[0]

    return find


def _projection_parts(block) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, weight [d_in, d_out], bias) of an attention block's Q, K and V: a fused Attention's packed layer is
    split into its three parts (ONNX Runtime's optimizer packs the exact weights, so each part is found by weight
    like a plain layer)."""
    if len(block.projections) > 1:
        return [(layer.name, layer.weight, layer.bias) for layer in block.projections]
    (layer,) = block.projections
    weights = np.split(np.asarray(layer.weight), 3, axis=1)
    biases = [None] * 3 if layer.bias is None else np.split(np.asarray(layer.bias), 3)
    return [(f"{layer.name} ({part})", w, b) for part, w, b in zip(("query", "key", "value"), weights, biases)]


def _linear(weight: np.ndarray, bias: np.ndarray | None, dtype) -> torch.nn.Linear:
    """An nn.Linear computing x·weight + bias (row convention, weight [d_in, d_out])."""
    layer = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)).to(torch.float32))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(np.asarray(bias)).to(torch.float32))
    return layer.to(dtype)


def apply_neuron_cuts(model: torch.nn.Module, cuts) -> list[str]:
    """Narrow FFN blocks (in place) as the ONNX path chose: each `(block, cut)` of `passes.compose.StructuredCuts`
    keeps `cut.keep` neurons of its up projection (and gate) and gets the refit down projection; modules are found
    by weight.
    Returns the up projections' module names."""
    find = module_by_weight(model)
    narrowed = []
    for block, cut in cuts:
        up_name, down_name = find(block.up.name, block.up.weight), find(block.down.name, block.down.weight)
        dtype = model.get_submodule(up_name).weight.dtype
        for layer in block.widening:  # the up projection, and a gated MLP's gate
            bias = None if layer.bias is None else np.asarray(layer.bias)[cut.keep]
            _replace(model, find(layer.name, layer.weight), _linear(np.asarray(layer.weight)[:, cut.keep], bias, dtype))
        _replace(model, down_name, _linear(cut.weight, cut.bias, dtype))
        narrowed.append(up_name)
    return narrowed


def apply_head_cuts(model: torch.nn.Module, cuts) -> list[str]:
    """Remove attention heads (in place) as the ONNX path chose: each `(block, kept heads, cut)` of
    `passes.compose.StructuredCuts` keeps the heads' Q, K, V columns and gets the refit output projection; the
    self-attention module (the parent of Q) is told its new head count. Returns the self-attention modules' names."""
    find = module_by_weight(model)
    narrowed = []
    for block, heads, cut in cuts:
        parts = _projection_parts(block)
        names = [find(name, weight) for name, weight, _ in parts] + [find(block.output.name, block.output.weight)]
        dtype = model.get_submodule(names[0]).weight.dtype
        for name, (_, weight, bias), columns in zip(names, parts, block.kept_columns(heads, cut.keep)):
            _replace(model, name, _linear(np.asarray(weight)[:, columns],
                                          None if bias is None else np.asarray(bias)[columns], dtype))
        _replace(model, names[-1], _linear(cut.weight, cut.bias, dtype))
        attention = model.get_submodule(names[0].rpartition(".")[0])
        attention.num_attention_heads = len(heads) * block.group_size  # BERT's module reads these; Llama's
        attention.all_head_size = len(heads) * block.group_size * block.head_dim  # views by head size
        narrowed.append(names[0].rpartition(".")[0])
    return narrowed


def apply_value_cuts(model: torch.nn.Module, cuts) -> list[str]:
    """Narrow every head's value width (in place) as the ONNX path chose: each `(block, ValueCut)` of
    `passes.compose.StructuredCuts` gets the new V (no bias: folded into O's) and O Linears, and the self-attention
    module (the parent of V) views its values with their own head size. Hugging Face's self-attention views Q, K and V
    with one head size, so its `forward` is replaced by `_narrow_value_forward` (written here: transformers has no
    option for a value head size of its own). Returns the self-attention modules' names."""
    import types

    find = module_by_weight(model)
    narrowed = []
    for block, cut in cuts:
        value, output = block.projections[-1], block.output
        names = [find(value.name, value.weight), find(output.name, output.weight)]
        dtype = model.get_submodule(names[0]).weight.dtype
        _replace(model, names[0], _linear(cut.value_weight, None, dtype))
        _replace(model, names[1], _linear(cut.output_weight, cut.output_bias, dtype))
        attention = model.get_submodule(names[0].rpartition(".")[0])
        attention.forward = types.MethodType(_narrow_value_forward, attention)
        narrowed.append(names[0].rpartition(".")[0])
    return narrowed


def _narrow_value_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A BERT-style self-attention (encoder, no cache) whose values have their own head size: Q and K are viewed
    as [b, s, H, h_d], V as [b, s, H, width / H]; the attention itself is the configured implementation's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    shape = hidden_states.shape[:-1]
    query = self.query(hidden_states).view(*shape, -1, self.attention_head_size).transpose(1, 2)
    key = self.key(hidden_states).view(*shape, -1, self.attention_head_size).transpose(1, 2)
    value = self.value(hidden_states).view(*shape, self.num_attention_heads, -1).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attend(self, query, key, value, attention_mask, dropout=self.dropout.p if self.training else 0.0,
                             scaling=self.scaling)
    return output.reshape(*shape, -1).contiguous(), weights


def remove_blocks(model: torch.nn.Module, dropped) -> list[int]:
    """Remove whole transformer blocks (in place) as the ONNX path dropped them: each `(block, layers, distortion)`
    of `passes.compose.StructuredCuts` names the block's linear layers; the block holding the first of them (found by
    weight) leaves the model's layer list, and the model's config says how many are left. Returns the removed
    indices in the original list (so that the teacher's matching blocks can be paired with the rest)."""
    from lrdeploy.torch.distill import transformer_blocks

    if not dropped:
        return []
    find, blocks = module_by_weight(model), transformer_blocks(model)
    removed = set()
    for block, layers, _ in dropped:
        name = next((found for layer in layers if (found := find(layer.name, layer.weight, required=False))), "")
        index = next((i for i, prefix in enumerate(blocks) if name.startswith(prefix + ".")), None)
        if index is None:
            raise ModelLoadError(f"{block.name}: none of its layers is an nn.Linear inside the model's list of "
                                 "transformer blocks, so the block cannot be removed; compress the model the plan was "
                                 "made from")
        removed.add(index)
    stack = model.get_submodule(blocks[0].rpartition(".")[0])
    for index in sorted(removed, reverse=True):
        del stack[index]
    for position, kept in enumerate(stack):  # a KV cache is indexed by layer: decoders know their place
        for module in kept.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "num_hidden_layers") and config.num_hidden_layers != len(stack):
            if len(getattr(config, "layer_types", None) or []) == config.num_hidden_layers:
                config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in removed]
            config.num_hidden_layers = len(stack)
    return sorted(removed)


def parameter_count(model: torch.nn.Module) -> int:
    return int(sum(np.prod(p.shape) for p in model.parameters()))
