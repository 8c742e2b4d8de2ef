"""Decoding: the KV-cached loops agree with full recomputation and with each other."""

from types import SimpleNamespace

import pytest
import torch

from conftest import FAMILIES, tiny_lm
from textvae.generation.decode import DecodingConfig, decode, generate_texts
from textvae.models.base import DecodeState

PROMPTS = [[1], [1, 40, 41, 42], [1, 50]]  # BOS-only and longer prompts, left-padded together


def _uncached_greedy(model, prompt, steps):
    tokens = list(prompt)
    out = []
    for _ in range(steps):
        ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = model.backbone.logits(model.backbone(ids, torch.ones_like(ids)).hidden[:, -1])
        token = int(logits.argmax(-1))
        if token == model.tokenizer.eos_id:
            break
        out.append(token)
        tokens.append(token)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_uncached_argmax_rollout(tiny_tokenizer, family):
    model = tiny_lm(tiny_tokenizer, family)
    config = DecodingConfig(strategy="greedy", max_new_tokens=12)
    cached = decode(model, PROMPTS, None, config)
    assert cached == [_uncached_greedy(model, prompt, 12) for prompt in PROMPTS]
    assert all(len(row) == 12 for row in cached)  # a random model rarely says EOS: full length


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_size_one_equals_greedy(tiny_tokenizer, family):
    model = tiny_lm(tiny_tokenizer, family)
    greedy = decode(model, PROMPTS, None, DecodingConfig(strategy="greedy", max_new_tokens=10))
    beam = decode(model, PROMPTS, None, DecodingConfig(strategy="beam", num_beams=1, max_new_tokens=10))
    assert beam == greedy


def _add_eos_bias(model, value):
    head = model.backbone.causal_lm.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    head.bias.data[model.tokenizer.eos_id] = value


class _LastToken:
    """A stand-in KV cache: remembers each row's last token."""

    def __init__(self, last):
        self.last = last

    def batch_select_indices(self, index):
        self.last = self.last[index]


class MarkovLM(torch.nn.Module):
    """Next-token log-probabilities depend on the last token only (a table [V, V])."""

    def __init__(self, table):
        super().__init__()
        self.table = table.log()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so decode() finds a device
        self.tokenizer = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2)
        self.backbone = SimpleNamespace(positions_left=lambda prompt_length: 1000)  # no position limit

    def decode_start(self, ids, mask, latent):
        state = DecodeState(_LastToken(ids[:, -1]), mask, mask.sum(1), latent)
        return self.table[ids[:, -1]], state

    def decode_next(self, state, tokens):
        state.cache.last = tokens
        return self.table[tokens]


def _trap() -> MarkovLM:
    """From BOS: token 3 (p=.6) leads to a spread over 10 tokens (p <= .18) that end in EOS;
    token 4 (p=.4) ends right away. Greedy takes 3; the likelier text is "4"."""
    table = torch.full((16, 16), 1e-9)
    table[1, 3], table[1, 4] = 0.6, 0.4
    table[3, 5:15] = torch.arange(10, 0, -1) / 55  # no ties: greedy and beam agree on order
    table[5:15, 2] = 1.0
    table[4, 2] = 1.0
    table[2, 2] = table[0, 2] = table[15, 2] = 1.0
    return MarkovLM(table / table.sum(-1, keepdim=True))


def test_beam_search_escapes_the_greedy_trap():
    model = _trap()
    greedy = decode(model, [[1]], None, DecodingConfig(strategy="greedy", max_new_tokens=5))
    assert greedy[0][0] == 3 and len(greedy[0]) == 2  # 3, then one of the ten, then EOS
    beam = decode(model, [[1]], None, DecodingConfig(strategy="beam", num_beams=2, max_new_tokens=5, length_penalty=0.0))
    assert beam == [[4]]  # log .4 > log .6 + log .18
    assert decode(model, [[1]], None, DecodingConfig(strategy="beam", num_beams=1, max_new_tokens=5)) == greedy


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)
    greedy = decode(model, PROMPTS, None, DecodingConfig(strategy="greedy", max_new_tokens=8))
    generator = torch.Generator().manual_seed(3)
    assert decode(model, PROMPTS, None, DecodingConfig(strategy="top-k", top_k=1, max_new_tokens=8), generator) == greedy
    assert decode(model, PROMPTS, None, DecodingConfig(strategy="top-p", top_p=1e-6, max_new_tokens=8), generator) == greedy


def _frequencies(logits, config, draws=4000):
    from textvae.generation.decode import choose_tokens

    tokens = choose_tokens(torch.tensor([logits]).expand(draws, -1), config, torch.Generator().manual_seed(0))
    return torch.bincount(tokens, minlength=len(logits)).double() / draws


def test_sampling_filters_draw_from_the_renormalised_distribution():
    """Tolerances are 4 standard errors of a frequency over 4,000 draws (at most 0.032)."""
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log().tolist()
    top_p = _frequencies(logits, DecodingConfig(strategy="top-p", top_p=0.6))  # 0.5 < 0.6: the 0.3 crosses it, kept
    assert top_p[2:].sum() == 0 and top_p[0] == pytest.approx(0.5 / 0.8, abs=0.032)
    top_k = _frequencies(logits, DecodingConfig(strategy="top-k", top_k=3))
    assert top_k[3] == 0 and top_k[2] == pytest.approx(0.15 / 0.95, abs=0.032)
    # temperature 0.5 squares the probabilities before top-k renormalises: 0.25, 0.09, 0.0225
    cold = _frequencies(logits, DecodingConfig(strategy="top-k", top_k=3, temperature=0.5))
    assert cold[0] == pytest.approx(0.25 / 0.3625, abs=0.032) and cold[3] == 0
    hot = _frequencies(logits, DecodingConfig(strategy="sample", temperature=2.0))  # square roots
    assert hot[3] == pytest.approx(0.05**0.5 / probabilities.sqrt().sum().item(), abs=0.032)


def test_sampling_is_reproducible_and_diverse(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)
    config = DecodingConfig(strategy="sample", max_new_tokens=8)
    first = generate_texts(model, 6, config, seed=7)
    assert generate_texts(model, 6, config, seed=7) == first
    assert len(set(first)) > 1
    assert generate_texts(model, 6, config, seed=8) != first


def test_decoding_stops_at_eos(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)
    _add_eos_bias(model, 1e4)  # EOS is everyone's first choice
    for strategy in ("greedy", "top-p", "beam"):
        assert decode(model, PROMPTS, None, DecodingConfig(strategy=strategy, max_new_tokens=5)) == [[], [], []]


def test_generation_stops_where_the_backbone_runs_out_of_positions(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)  # 64 positions
    eos = tiny_tokenizer.eos_id
    model.backbone.logits = lambda hidden: torch.nn.functional.one_hot(  # never EOS
        torch.full(hidden.shape[:-1], (eos + 1) % tiny_tokenizer.vocab_size), tiny_tokenizer.vocab_size).float()
    prompt = [1] + [40] * 59
    for strategy in ("greedy", "beam"):
        out = decode(model, [prompt], None, DecodingConfig(strategy=strategy, num_beams=2, max_new_tokens=20))
        assert len(out[0]) == 4  # 60 + 4 = the 64 positions
    with pytest.raises(Exception, match="no room"):
        decode(model, [[1] * 64], None, DecodingConfig(strategy="greedy"))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_of_a_batch_generates_as_far_as_its_own_positions_allow(tiny_tokenizer, family):
    model = tiny_lm(tiny_tokenizer, family)  # 64 positions
    eos = tiny_tokenizer.eos_id
    scores = model.backbone.logits
    model.backbone.logits = lambda hidden: scores(hidden).index_fill(-1, torch.tensor([eos]), -1e9)  # never EOS
    long, short = [1] + [40] * 59, [1, 40, 41]
    config = DecodingConfig(strategy="greedy", max_new_tokens=20)
    together = decode(model, [long, short], None, config)
    assert [len(row) for row in together] == [4, 20]  # 60 + 4 = 64 positions; the short prompt is not cut to 4
    assert together == [decode(model, [long], None, config)[0], decode(model, [short], None, config)[0]]
