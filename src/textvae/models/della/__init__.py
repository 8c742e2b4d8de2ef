"""DELLA: layer-wise latent variables fused into every decoder layer (model.py reads top to bottom)."""

from textvae.models.della.config import DellaConfig
from textvae.models.della.fusion import AdditiveFusion, LowRankTensorFusion, ProductOfSumsFusion
from textvae.models.della.model import Della

__all__ = ["AdditiveFusion", "Della", "DellaConfig", "LowRankTensorFusion", "ProductOfSumsFusion"]
