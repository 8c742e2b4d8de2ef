"""Options of the segment-wise models (trace-r, trace-p, ind, cgd): segments, the latent size,
TRACE's posterior normalisation and the Table 5 ablations."""

from __future__ import annotations

from dataclasses import dataclass

from textvae.data.segment import Segmenter
from textvae.errors import TextVAEError


@dataclass
class SegmentLatentConfig:
    name: str = "trace-r"
    latent_size: int = 32
    segment: str = "fixed"  # fixed | words | sentence
    segment_length: int = 10  # tokens (fixed) or words (words) per segment
    share_encoder: bool = True
    posterior_norm: str = "ln"  # ln | bn | none: normalisation of TRACE's residual posterior
    # (norm_over and norm_shift say how; with none they have no effect)
    norm_over: str = "both"  # both ([d_mu, log d_sigma^2] together, Eq. 11) | mean (d_mu only: Theorem 1's floor)
    norm_shift: str = "learned"  # learned (BN-VAE's beta, which Theorem 1's proof cites) | zero
    ln_gamma: float = 3.0  # its fixed scale
    residual_posterior: bool = True  # false: Table 5's -RP, q(z_t | x_t) = N(d_mu_t, d_sigma_t^2)
    spectral_norm: bool = True  # trace-p: on the z-to-z maps F_mu1, F_sig1
    kl_threshold: float = 0.0  # per-dimension free bits; 0 = off
    conditional: bool | None = None  # the source is segment 0 (None: when the data has one)

    def validate(self) -> None:
        Segmenter(self.segment, self.segment_length).validate()
        if self.posterior_norm not in ("ln", "bn", "none"):
            raise TextVAEError(f"model.posterior_norm must be ln, bn or none, got {self.posterior_norm!r}")
        if self.norm_over not in ("mean", "both"):
            raise TextVAEError(f"model.norm_over must be mean or both, got {self.norm_over!r}")
        if self.norm_shift not in ("zero", "learned"):
            raise TextVAEError(f"model.norm_shift must be zero or learned, got {self.norm_shift!r}")
        if self.latent_size < 1 or self.ln_gamma <= 0 or self.kl_threshold < 0:
            raise TextVAEError("model.latent_size >= 1, model.ln_gamma > 0 and model.kl_threshold >= 0 needed")
