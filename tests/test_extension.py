"""Adding a model is one class and one registry entry: a new single-latent injection model,
defined here, trains, evaluates, decodes and saves through every public path."""

import pytest
import torch

import textvae
from conftest import demo_lines
from textvae.models import registry
from textvae.models.single import SingleLatentVAE


class EmbedSoftmax(SingleLatentVAE):
    """z at the input embeddings and before the LM head."""

    name = "embed-softmax"
    injection_points = ("embed", "softmax")


@pytest.mark.slow
def test_a_new_single_latent_model_needs_only_its_class_and_a_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.MODELS, EmbedSoftmax.name, EmbedSoftmax)  # the registry entry
    data = tmp_path / "data"
    data.mkdir()
    for split, count in (("train", 64), ("valid", 8), ("test", 8)):
        (data / f"{split}.txt").write_text("\n".join(demo_lines(split, count)) + "\n", encoding="utf-8")
    textvae.train({"model": {"name": "embed-softmax"}, "data": {"max_length": 24, "vocab_size": 300},
                   "train": {"max_steps": 3, "precision": "fp32", "batch_size": 16}}, out=tmp_path / "run", data=str(data))
    vae = textvae.load(tmp_path / "run")
    assert isinstance(vae.model, EmbedSoftmax) and vae.latent_kind == "single"
    metrics = textvae.evaluate(tmp_path / "run", iw_samples=3)
    assert metrics["kl"] > 0 and metrics["nll"] <= metrics["elbo"] + 3 * metrics["elbo_stderr"]
    with torch.no_grad():  # both injection points are live
        torch.nn.init.normal_(vae.model.latent_to_head.weight)
    injection = vae.model.injection(torch.ones(1, vae.model.config.latent_size))
    assert injection.embed_offset is not None and injection.head_offset is not None and injection.memory is None
    texts = demo_lines("test", 3)
    assert len(vae.reconstruct(texts)) == 3 and len(vae.sample(2)) == 2
