"""A picture of a trained model's latent space: posterior means projected to 2-D (PCA, or
t-SNE), one panel per latent group (DELLA: per latent layer; segment-wise models: every present
segment of every text in one panel), coloured by label; below each, the variance over texts of
each dimension's posterior mean, the quantity behind AU (active when above 0.01)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from textvae.errors import TextVAEError
from textvae.files import write_atomically

AU_DELTA = 0.01


def project(points: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, P] -> [N, 2] by PCA or t-SNE (perplexity at most 30, below N)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        projected = PCA(n_components=min(2, *points.shape), random_state=seed).fit_transform(points)
        return np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))  # one text or one dimension: a line
    if method == "tsne":
        from sklearn.manifold import TSNE

        if len(points) < 3:
            raise TextVAEError("t-SNE needs at least 3 texts")
        return TSNE(n_components=2, perplexity=min(30.0, len(points) - 1.0), init="pca",
                    random_state=seed).fit_transform(points)
    raise TextVAEError(f"projection must be pca or tsne, got {method!r}")


def plot_latent(vae, texts: list[str], out: str | Path, labels: list[str] | None = None, method: str = "pca",
                seed: int = 0) -> Path:
    """Write the picture of `texts`' posterior means to `out` (PNG) and return its path.
    `vae`: a `textvae.TrainedVAE`; `labels`: one per text (colours and legend)."""
    if importlib.util.find_spec("matplotlib") is None or importlib.util.find_spec("sklearn") is None:
        raise TextVAEError("plotting the latent space needs matplotlib and scikit-learn (pip install 'textvae[dev,metrics]')")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(texts):
        raise TextVAEError(f"{len(labels)} labels for {len(texts)} texts: give one label per text")
    if len(texts) < 2:
        raise TextVAEError("plotting a latent space needs at least 2 texts")
    if method not in ("pca", "tsne"):
        raise TextVAEError(f"projection must be pca or tsne, got {method!r}")
    posterior = vae.encode(texts)
    mean, present = posterior.mean.numpy(), posterior.present.numpy()
    text_labels = np.asarray(labels if labels is not None else [""] * len(texts))
    if posterior.kind == "segment":  # every segment is one observation of the same space
        panels = [("segments", mean[present], np.repeat(text_labels, present.sum(1)))]
    else:
        names = ["z"] if mean.shape[1] == 1 else [f"layer {g + 1}" for g in range(mean.shape[1])]
        panels = [(name, mean[:, g], text_labels) for g, name in enumerate(names)]

    figure, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7), squeeze=False)
    classes = sorted(set(text_labels.tolist()))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for column, (name, points, point_labels) in enumerate(panels):
        projected = project(points.astype(np.float64), method, seed)
        scatter = axes[0, column]
        for index, label in enumerate(classes):
            chosen = point_labels == label
            scatter.scatter(projected[chosen, 0], projected[chosen, 1], s=12, color=colours(index % colours.N),
                            label=label or None, alpha=0.8)
        scatter.set_title(f"{name}: posterior means ({method.upper() if method == 'pca' else 't-SNE'})")
        variance = points.var(axis=0, ddof=1) if len(points) > 1 else np.zeros(points.shape[1])
        bars = axes[1, column]
        bars.bar(np.arange(len(variance)), variance, color=np.where(variance > AU_DELTA, "tab:blue", "tab:gray"))
        bars.axhline(AU_DELTA, color="tab:red", linewidth=0.8, linestyle="--")
        bars.set_yscale("symlog", linthresh=AU_DELTA)
        bars.set_title(f"{name}: Var[mean] per dim, {int((variance > AU_DELTA).sum())} active")
        bars.set_xlabel("latent dimension")
    if labels is not None:
        axes[0, 0].legend(fontsize=8, loc="best")
    figure.tight_layout()
    out = Path(out)
    try:
        write_atomically(out, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    finally:
        plt.close(figure)
    return out
