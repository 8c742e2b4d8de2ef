"""The encoder-decoder backbone: the bare BART model's numbers, the shared layout split at
[SEP], a KV cache that reproduces the full pass, and the decoder-side injection points
behaving as on decoder-only backbones."""

import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration

from conftest import ScaleFusion
from textvae.backbone.inject import Injection
from textvae.backbone.inject import inject_value_fusion, memory_positions
from textvae.backbone.seq2seq import Seq2SeqBackbone

SEP = 3


def tiny_bart(seed: int = 0) -> Seq2SeqBackbone:
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = BartForConditionalGeneration(config).eval()
    nn.init.normal_(model.final_logits_bias, std=0.5)  # zero by default: make it count
    return Seq2SeqBackbone(model, sep_id=SEP)


def _inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(SEP + 1, 97, (2, 9), generator=generator)
    source_mask = torch.ones_like(source)
    source_mask[1, -3:] = 0
    target = torch.randint(SEP + 1, 97, (2, 6), generator=generator)
    target_mask = torch.ones_like(target)
    target_mask[0, -2:] = 0
    return source, source_mask, target, target_mask


def _logits(backbone, source, source_mask, target, target_mask, **parts):
    with torch.no_grad():
        context = backbone.encode(source, source_mask)
        return backbone.logits(backbone.run_decoder(target, target_mask, source=context, injection=Injection(**parts)).hidden)


def test_decoder_logits_equal_the_bare_bart_model():
    backbone = tiny_bart()
    source, source_mask, target, target_mask = _inputs()
    with torch.no_grad():
        reference = backbone.seq2seq_lm(input_ids=source, attention_mask=source_mask, decoder_input_ids=target,
                                        decoder_attention_mask=target_mask).logits
    ours = _logits(backbone, source, source_mask, target, target_mask)
    real = target_mask.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=0, atol=1e-5)
    context = backbone.encode(source, source_mask)
    assert len(context.states) == backbone.num_encoder_layers + 1 == 3


def test_cached_token_by_token_decoding_equals_the_full_pass():
    backbone = tiny_bart()
    source, source_mask, target, _ = _inputs()
    full_mask = torch.ones_like(target)
    full = _logits(backbone, source, source_mask, target, full_mask)
    vectors = torch.randn(2, backbone.num_layers * 2 * backbone.value_size)
    memory = memory_positions(vectors, backbone.num_layers, backbone.num_kv_heads, backbone.head_dim)
    for use_memory in (False, True):
        expected = _logits(backbone, source, source_mask, target, full_mask, memory=memory if use_memory else None)
        if use_memory:
            assert (expected - full).abs().amax(-1).min() > 1e-4  # every position reads the memory
        with torch.no_grad():
            context = backbone.encode(source, source_mask)
            cache = backbone.new_cache(memory if use_memory else None)
            steps = []
            for t in range(target.shape[1]):
                mask = torch.ones(2, t + 1 + use_memory, dtype=torch.long)
                out = backbone.run_decoder(target[:, t : t + 1], mask, source=context, cache=cache)
                cache = out.cache
                steps.append(backbone.logits(out.hidden))
        torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=0, atol=1e-5)


def test_identity_value_fusion_on_decoder_self_attention_changes_nothing():
    backbone = tiny_bart()
    source, source_mask, target, target_mask = _inputs()
    plain = _logits(backbone, source, source_mask, target, target_mask)
    fusions = [ScaleFusion(backbone.value_size, 5) for _ in range(backbone.num_layers)]
    inject_value_fusion(backbone, fusions)
    latents = [torch.randn(2, 5) for _ in range(backbone.num_layers)]
    fused = _logits(backbone, source, source_mask, target, target_mask, value_latents=latents)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    nn.init.normal_(fusions[0].weight.weight)
    fused = _logits(backbone, source, source_mask, target, target_mask, value_latents=latents)
    assert (fused - plain).abs().max() > 1e-3
    # the encoder's self-attention is not wrapped: the source reading is untouched by latents
    assert all(not hasattr(layer.self_attn.v_proj, "fusion") for layer in backbone.seq2seq_lm.get_encoder().layers)


def test_offsets_move_every_real_decoder_position():
    backbone = tiny_bart()
    source, source_mask, target, target_mask = _inputs()
    plain = _logits(backbone, source, source_mask, target, target_mask)
    shift = torch.randn(2, backbone.hidden_size)
    for name in ("embed_offset", "head_offset"):
        zero = _logits(backbone, source, source_mask, target, target_mask, **{name: torch.zeros_like(shift)})
        assert torch.equal(zero, plain)
        changed = _logits(backbone, source, source_mask, target, target_mask, **{name: shift})
        assert (changed - plain)[target_mask.bool()].abs().amax(-1).min() > 0, name


def _layout(source, source_mask, target, target_mask):
    """Right-padded layout rows [BOS] source [SEP] target (pads between dropped)."""
    rows = [[1, *s[m.bool()].tolist(), SEP, *t[n.bool()].tolist()] for s, m, t, n in zip(source, source_mask, target, target_mask)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row)], mask[index, : len(row)] = torch.tensor(row), 1
    return ids, mask


def test_layout_rows_run_as_encoder_on_the_source_and_decoder_from_the_separator():
    backbone = tiny_bart()
    source, source_mask, target, target_mask = _inputs()
    ids, mask = _layout(source, source_mask, target, target_mask)
    with torch.no_grad():
        hidden = backbone(ids, mask).hidden
    for row in range(2):
        s = torch.tensor([[1, *source[row][source_mask[row].bool()].tolist(), SEP]])
        t = torch.tensor([[SEP, *target[row][target_mask[row].bool()].tolist()]])
        with torch.no_grad():
            reference = backbone.seq2seq_lm.model(input_ids=s, decoder_input_ids=t).last_hidden_state[0]
        start = s.shape[1] - 1  # the [SEP] is the decoder's first token
        torch.testing.assert_close(hidden[row, start : start + t.shape[1]], reference, rtol=0, atol=1e-5)
        assert hidden[row, :start].abs().max() == 0  # source positions carry nothing to score
        assert hidden[row, start + t.shape[1]:].abs().sum() == 0  # nor padding


def test_decoder_never_reads_later_target_tokens():
    backbone = tiny_bart()
    ids, mask = _layout(*_inputs())
    changed = ids.clone()
    last = int(mask[0].sum()) - 1
    changed[0, last] = 50 if ids[0, last] != 50 else 51
    with torch.no_grad():
        before, after = backbone(ids, mask).hidden, backbone(changed, mask).hidden
    torch.testing.assert_close(after[0, :last], before[0, :last], rtol=0, atol=0)
    assert (after[0, last] - before[0, last]).abs().max() > 1e-4


def test_a_row_without_separator_is_refused_in_one_line():
    from textvae.errors import TextVAEError

    backbone = tiny_bart()
    ids = torch.tensor([[1, 5, 6, 7]])
    try:
        backbone(ids, torch.ones_like(ids))
    except TextVAEError as err:
        assert "source" in str(err)
    else:
        raise AssertionError("no error")
