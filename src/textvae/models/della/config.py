"""DELLA's options: the paper's model and its ablations (docs/architecture.md, "DELLA")."""

from __future__ import annotations

from dataclasses import dataclass

from textvae.errors import TextVAEError
from textvae.models.encoder import POOLINGS


@dataclass
class DellaConfig:
    name: str = "della"
    latent_size: int = 32  # per latent layer
    rank: int = 4  # r of the low-rank tensor product
    share_encoder: bool = True
    state_norm: bool = True  # layer-normalise the per-layer encoder states x_l, c_l (see TextEncoder)
    pooling: str = "attention"  # attention | first | mean: how x_l summarises layer l (models/encoder.py)
    fusion: str = "ltp"  # ltp | add
    ltp_form: str = "lowrank"  # lowrank (sum of r products) | paper (Eq. 9: product of two sums)
    ltp_init: str = "identity"  # identity (v' = v at the start) | random (the released code)
    latent_begin: int = 1  # first layer with a latent (1-based)
    latent_end: int | None = None  # last layer with a latent (default: the top layer)
    independent: bool = False  # Separate: no summary of lower latents, priors N(0, I)
    layerwise: bool = True  # false: the -LW row, one latent (from the top layer) fused into every layer
    kl_layers: str = "all"  # all | first | last: the layers whose KL the loss penalises
    kl_reduction: str = "sum"  # sum | mean over the penalised layers (the reported KL is summed)
    kl_threshold: float = 0.0  # per-dimension free bits; 0 = off
    bow_weight: float = 0.0  # bag-of-words loss from all latents; 0 = off
    conditional: bool | None = None  # CVAE: prior and posterior read the source (None: when the data has one)

    def validate(self) -> None:
        choices = {"fusion": ("ltp", "add"), "ltp_init": ("identity", "random"), "ltp_form": ("lowrank", "paper"),
                   "pooling": POOLINGS,
                   "kl_layers": ("all", "first", "last"), "kl_reduction": ("sum", "mean")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise TextVAEError(f"model.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.latent_size < 1 or self.rank < 1 or self.latent_begin < 1:
            raise TextVAEError("model.latent_size, model.rank and model.latent_begin must be >= 1")
        if self.latent_end is not None and self.latent_end < self.latent_begin:
            raise TextVAEError(f"model.latent_end ({self.latent_end}) is below model.latent_begin ({self.latent_begin})")
        if self.kl_threshold < 0 or self.bow_weight < 0:
            raise TextVAEError("model.kl_threshold and model.bow_weight must be >= 0")
