"""How z_l enters decoder layer l: every value vector v is fused with z_l (DELLA section 4.2).

    lowrank   v' = sum_{j=1..r} (U_j [v; 1]) * (V_j [z_l; 1])   the true rank-r tensor product
    paper     v' = (sum_j W_v^j [v; 1]) * (sum_j W_z^j [z_l; 1])  Eq. 9 as printed
    add       v' = v + W z_l                                       the -LTP ablation

Each fusion `prepare`s what z contributes once, so decoding (one token a step) reuses it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def make_fusion(kind: str, form: str, value_size: int, latent_size: int, rank: int, init: str) -> nn.Module:
    """The fusion of one layer as `model.fusion` / `model.ltp_form` / `model.ltp_init` say."""
    if kind == "add":
        return AdditiveFusion(value_size, latent_size)
    cls = LowRankTensorFusion if form == "lowrank" else ProductOfSumsFusion
    return cls(value_size, latent_size, rank, init)


class LowRankTensorFusion(nn.Module):
    """v' = sum_j (U_j v + u_j) * g_j with gates g_j = V_j [z; 1]: values [B, T, V], z [B, P].

    Long inputs (training, prompts) apply one per-example matrix W_b = sum_j diag(g_j) U_j to
    all T positions: (r + T) V^2 per example instead of r T V^2. Short inputs (decoding, one
    token a step) use one shared GEMM with the stacked U_j and the gates `prepare`d once."""

    def __init__(self, value_size: int, latent_size: int, rank: int, init: str):
        super().__init__()
        self.rank, self.value_size = rank, value_size
        self.value_maps = nn.Parameter(torch.empty(rank, value_size, value_size))  # U_j (out, in)
        self.value_bias = nn.Parameter(torch.zeros(rank, value_size))  # u_j
        self.gates = nn.Linear(latent_size, rank * value_size)  # V_j [z; 1]
        if init == "random":  # the released code: normal(0, 0.02) weights, zero biases
            released_init(weights=(self.value_maps, self.gates.weight), biases=(self.value_bias, self.gates.bias))
        else:  # U_1 = I, V_1 [z; 1] = 1, the rest 0: v' = v, all parts trainable
            bound = 1 / math.sqrt(value_size)
            nn.init.uniform_(self.value_maps, -bound, bound)  # nn.Linear's default for U_j, j > 1
            with torch.no_grad():
                self.value_maps[0].copy_(torch.eye(value_size))
                nn.init.zeros_(self.gates.weight)
                self.gates.bias.zero_()
                self.gates.bias[:value_size] = 1.0

    def prepare(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What z [B, P] contributes: gates [B, r, V] and the summed bias sum_j g_j u_j [B, V]."""
        gates = self.gates(latent).view(latent.shape[0], self.rank, self.value_size)
        return gates, torch.einsum("brv,rv->bv", gates, self.value_bias.to(gates.dtype))

    def forward(self, values: torch.Tensor, latent) -> torch.Tensor:
        """values [B, T, V]; latent: z [B, P], or `prepare(z)` (decoding reuses it every step)."""
        gates, bias = self.prepare(latent) if isinstance(latent, torch.Tensor) else latent
        gates, bias = gates.to(values.dtype), bias.to(values.dtype)[:, None]
        maps = self.value_maps.to(values.dtype)
        batch, length, _ = values.shape
        if length > self.rank:
            matrices = torch.einsum("brv,rvw->bvw", gates, maps)  # [B, V, V]
            return torch.einsum("btw,bvw->btv", values, matrices) + bias
        projected = (values @ maps.flatten(0, 1).T).view(batch, length, self.rank, self.value_size)
        return (projected * gates[:, None]).sum(2) + bias


class ProductOfSumsFusion(nn.Module):
    """Eq. 9 as printed: v' = (sum_j (W_v^j v + b_v^j)) * (sum_j (W_z^j z + b_z^j)) for values
    [B, T, V], z [B, P]. The sums are taken before the product, so this is one value map times
    one latent gate for any r (r only changes the parametrisation)."""

    def __init__(self, value_size: int, latent_size: int, rank: int, init: str):
        super().__init__()
        self.value_maps = nn.Parameter(torch.empty(rank, value_size, value_size))  # W_v^j (out, in)
        self.value_bias = nn.Parameter(torch.zeros(rank, value_size))
        self.gate_maps = nn.Parameter(torch.empty(rank, value_size, latent_size))  # W_z^j (out, in)
        self.gate_bias = nn.Parameter(torch.zeros(rank, value_size))
        if init == "random":
            released_init(weights=(self.value_maps, self.gate_maps), biases=(self.value_bias, self.gate_bias))
        else:  # sum_j W_v^j = I, sum_j W_z^j z = 0, sum_j b_z^j = 1: v' = v
            with torch.no_grad():
                self.value_maps.zero_()
                self.value_maps[0].copy_(torch.eye(value_size))
                self.gate_maps.zero_()
                self.gate_bias[0] = 1.0

    def prepare(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        """The gate (sum_j W_z^j) z + sum_j b_z^j: ([B, V],)."""
        return (latent @ self.gate_maps.sum(0).to(latent.dtype).T + self.gate_bias.sum(0).to(latent.dtype),)

    def forward(self, values: torch.Tensor, latent) -> torch.Tensor:
        """values [B, T, V]; latent: z [B, P], or `prepare(z)`."""
        (gate,) = self.prepare(latent) if isinstance(latent, torch.Tensor) else latent
        mapped = values @ self.value_maps.sum(0).to(values.dtype).T + self.value_bias.sum(0).to(values.dtype)
        return mapped * gate[:, None].to(values.dtype)


def released_init(weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor, ...]) -> None:
    """The released DELLA code's initialisation: weights normal(0, 0.02), biases 0."""
    with torch.no_grad():
        for weight in weights:
            weight.normal_(0.0, 0.02)
        for bias in biases:
            bias.zero_()


class AdditiveFusion(nn.Module):
    """v' = v + W z (the -LTP ablation); W starts at zero, so v' = v at the start."""

    def __init__(self, value_size: int, latent_size: int):
        super().__init__()
        self.project = nn.Linear(latent_size, value_size, bias=False)
        nn.init.zeros_(self.project.weight)

    def prepare(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        """The per-example shift W z: ([B, V],)."""
        return (self.project(latent),)

    def forward(self, values: torch.Tensor, latent) -> torch.Tensor:
        """values [B, T, V]; latent: z [B, P], or `prepare(z)`."""
        (shift,) = self.prepare(latent) if isinstance(latent, torch.Tensor) else latent
        return values + shift[:, None].to(values.dtype)
