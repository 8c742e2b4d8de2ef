"""Segment-wise latent models: TRACE-R and TRACE-P (trace_r.py, trace_p.py over residual.py),
the IND and CGD baselines (baselines.py), on shared parts (segment_vae.py, chain.py, layout.py)."""

from textvae.models.trace.baselines import ContextConditioned, Independent
from textvae.models.trace.chain import SegmentChain
from textvae.models.trace.config import SegmentLatentConfig
from textvae.models.trace.layout import SegmentLayout
from textvae.models.trace.norm import ResidualNorm
from textvae.models.trace.trace_p import TraceP
from textvae.models.trace.trace_r import TraceR

__all__ = ["ContextConditioned", "Independent", "ResidualNorm", "SegmentChain", "SegmentLatentConfig",
           "SegmentLayout", "TraceP", "TraceR"]
