"""LowRankLinear: an nn.Linear replaced by two thin ones, y = second(first(x)).

Exported to ONNX it is two MatMuls (plus the bias Add), the same structure `lrdeploy build` emits.
"""

from __future__ import annotations

import numpy as np
import torch

from lrdeploy.lowrank.decompose import LowRankFactors


class LowRankLinear(torch.nn.Module):
    """x ─Linear(d_in→k, no bias)─ Linear(k→d_out, bias)─► y; `rank` = k."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = torch.nn.Linear(in_features, rank, bias=False)
        self.second = torch.nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, factors: LowRankFactors, dtype: torch.dtype = torch.float32) -> "LowRankLinear":
        """Row-convention factors (y = x·A·B + c) as a module: first.weight = Aᵀ, second.weight = Bᵀ."""
        d_in, rank = factors.first.shape
        layer = cls(d_in, factors.second.shape[1], rank, bias=factors.bias is not None)
        with torch.no_grad():
            layer.first.weight.copy_(torch.from_numpy(np.ascontiguousarray(factors.first.T)).to(dtype))
            layer.second.weight.copy_(torch.from_numpy(np.ascontiguousarray(factors.second.T)).to(dtype))
            if factors.bias is not None:
                layer.second.bias.copy_(torch.from_numpy(np.asarray(factors.bias)).to(dtype))
        return layer.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
