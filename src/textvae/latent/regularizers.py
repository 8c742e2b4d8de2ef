"""Training tricks against posterior collapse: KL threshold (free bits), bag-of-words loss,
and batch normalisation of the posterior mean with a fixed scale.

* KL threshold (Kingma et al., 2016; Optimus's lambda): per latent dimension and example,
  a KL below `threshold` is not penalised (Optimus's released code masks those terms). Being
  per example, the penalty does not depend on how a batch is split over processes.
* Bag-of-words loss (Wang et al., 2017): z alone must predict the multiset of target tokens,
  which forces it to carry content.
* Mean batch-norm (Zhu et al., 2020, BN-VAE): mu is batch-normalised with a fixed gamma, so
  E_x[mu_d^2] >= gamma^2 and the expected KL per dimension cannot fall below gamma^2 / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def thresholded_kl(kl_per_dim: torch.Tensor, threshold: float) -> torch.Tensor:
    """KL terms to penalise: [B, P] -> [B], dropping dimensions whose KL is below `threshold`."""
    if threshold <= 0:
        return kl_per_dim.sum(-1)
    return (kl_per_dim * (kl_per_dim > threshold)).sum(-1)


class BagOfWords(nn.Module):
    """Predicts the bag of target tokens from z: loss = -sum_{tokens t} log softmax(W z)_t."""

    def __init__(self, latent_size: int, vocab_size: int):
        super().__init__()
        self.project = nn.Linear(latent_size, vocab_size)

    def forward(self, z: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """z: [B, P]; input_ids, target_mask: [B, T] -> summed NLL of the target tokens [B]."""
        log_probs = F.log_softmax(self.project(z).float(), dim=-1)  # [B, V]
        token_log_probs = log_probs.gather(1, input_ids)  # [B, T]
        return -(token_log_probs * target_mask).sum(1)


class MeanBatchNorm(nn.Module):
    """Batch-norm of the posterior mean with a fixed scale `gamma` and a learned shift."""

    def __init__(self, latent_size: int, gamma: float):
        super().__init__()
        self.norm = nn.BatchNorm1d(latent_size, affine=False)
        self.shift = nn.Parameter(torch.zeros(latent_size))
        self.gamma = gamma

    def forward(self, mean: torch.Tensor) -> torch.Tensor:
        """mean: [B, P] -> [B, P]; running statistics are used in eval mode (and for a
        training batch of one example, which has no batch statistics)."""
        norm = self.norm
        use_batch = self.training and mean.shape[0] > 1
        normalised = F.batch_norm(
            mean.float(), norm.running_mean, norm.running_var, training=use_batch, momentum=norm.momentum, eps=norm.eps
        )
        return self.gamma * normalised.to(mean.dtype) + self.shift
