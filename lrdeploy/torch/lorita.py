"""Low-rank induced training (LoRITa): over-parameterise each linear map as a product of N linears, train
with weight decay (which, on a product, favours low rank), then collapse the product and truncate its
singular values under a rank budget into LowRankLinear.

    overparameterize:  Linear(W, b)  ⇒  Linear(M₁) → … → Linear(M_N, b),   M_N·…·M₁ = W exactly
    collapse:          product W' = M_N·…·M₁  ⇒  truncated SVD (ranks allocated under the budget)
"""

from __future__ import annotations

import torch

from lrdeploy.lowrank.allocate import LayerShape, allocate
from lrdeploy.lowrank.decompose import decompose
from lrdeploy.torch.compress import _replace
from lrdeploy.torch.lowrank_linear import LowRankLinear


class FactoredLinear(torch.nn.Module):
    """A linear map stored as a product of `depth` linears (the last one carries the bias)."""

    def __init__(self, factors: list[torch.nn.Linear]):
        super().__init__()
        self.factors = torch.nn.ModuleList(factors)
        self.in_features, self.out_features = factors[0].in_features, factors[-1].out_features

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, depth: int) -> "FactoredLinear":
        """Balanced factors of W = U·Σ·Vᵀ: Σ^{1/N}·Vᵀ, then Σ^{1/N} (N−2 times), then U·Σ^{1/N}."""
        weight = linear.weight.detach().to(torch.float64)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s ** (1.0 / depth)
        mats = [root[:, None] * vh] + [torch.diag(root) for _ in range(depth - 2)] + [u * root]
        factors = []
        for index, mat in enumerate(mats):
            last = index == depth - 1
            layer = torch.nn.Linear(mat.shape[1], mat.shape[0], bias=last and linear.bias is not None)
            with torch.no_grad():
                layer.weight.copy_(mat.to(linear.weight.dtype))
                if last and linear.bias is not None:
                    layer.bias.copy_(linear.bias.detach())
            factors.append(layer)
        return cls(factors)

    def product(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W [out, in], b) of the collapsed map."""
        weight = self.factors[0].weight
        for factor in self.factors[1:]:
            weight = factor.weight @ weight
        return weight, self.factors[-1].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for factor in self.factors:
            x = factor(x)
        return x


def overparameterize(model: torch.nn.Module, depth: int = 3, exclude: tuple[str, ...] = ()) -> torch.nn.Module:
    """Replace every nn.Linear of `model` (in place) by a FactoredLinear of `depth` factors; same function."""
    if depth < 2:
        raise ValueError("depth must be at least 2")
    from lrdeploy.torch.compress import linear_layers

    for name, linear in linear_layers(model, exclude).items():
        _replace(model, name, FactoredLinear.from_linear(linear, depth))
    return model


@torch.no_grad()
def collapse(model: torch.nn.Module, rank_budget: float, rank_multiple: int = 1,
             allocation: str = "uniform") -> dict[str, int | None]:
    """Multiply every FactoredLinear back and truncate its SVD under `rank_budget` into LowRankLinear
    (or a plain Linear where the rank would not save parameters); returns the rank plan."""
    factored = {n: m for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
    shapes = [LayerShape(n, m.in_features, m.out_features) for n, m in factored.items()]
    decompositions = {}
    for name, module in factored.items():
        weight, bias = module.product()
        decompositions[name] = decompose("svd", weight.to(torch.float64).numpy().T,
                                         None if bias is None else bias.to(torch.float64).numpy())
    plan = allocate(allocation, shapes, rank_budget, rank_multiple, {n: d.energies for n, d in decompositions.items()})
    for name, module in factored.items():
        dtype = module.factors[0].weight.dtype
        if plan[name] is None:
            weight, bias = module.product()
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=bias is not None)
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
            _replace(model, name, dense.to(dtype))
        else:
            _replace(model, name, LowRankLinear.from_factors(decompositions[name].factors(plan[name]), dtype))
    return plan
