"""textvae: Transformer VAEs for text (DELLA, TRACE and their baselines).

The Python API (docs/api.md): `textvae.load(run_dir)` -> `TrainedVAE` (encode, decode,
sample, reconstruct, interpolate, attribute_vector, steer, analogy, log_likelihood, score,
save), `textvae.train(...)`, `textvae.evaluate(...)`, `textvae.compare(...)`,
`textvae.score(...)`, `textvae.report(...)`, `textvae.plot_latent(...)`. Imported on first
use, so that `import textvae` stays cheap.
"""

from textvae.errors import TextVAEError

__all__ = ["Posterior", "TextVAEError", "TrainedVAE", "compare", "evaluate", "load", "plot_latent", "report", "score",
           "train"]


def __getattr__(name: str):
    if name in ("Posterior", "TrainedVAE", "compare", "evaluate", "load", "report", "score", "train"):
        from textvae import api

        return getattr(api, name)
    if name == "plot_latent":
        from textvae.evaluation.latent_plot import plot_latent

        return plot_latent
    raise AttributeError(f"module 'textvae' has no attribute {name!r}")
