"""The CPU speed paths of generation give exactly what the stock transformers paths give.

* ``EosSuppressionUntilLength`` replaces ``MinLength`` / ``MinNewTokensLength`` processors (in place, no
  full-vocabulary temporaries);
* ``_output_layer`` applies the output layer in vocabulary blocks on CPU without gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clipcap_config
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)

from modeling_clipcap import ClipCapForConditionalGeneration
from modeling_clipcap.modeling_clipcap import EosSuppressionUntilLength


def make_model(vocab_size: int, seed: int = 0) -> ClipCapForConditionalGeneration:
    torch.manual_seed(seed)
    return ClipCapForConditionalGeneration(tiny_clipcap_config(vocab_size, with_vision=False)).eval()


def eos_loving(model: ClipCapForConditionalGeneration) -> ClipCapForConditionalGeneration:
    """Make EOS the arg-max almost everywhere, so that any failure to suppress it shows in the tokens."""
    eos = model.config.text_config.eos_token_id
    ln_f = model.language_model.transformer.ln_f
    with torch.no_grad():
        ln_f.weight.mul_(0.2)  # final hidden states = a common direction + a smaller per-position part
        ln_f.bias.copy_(torch.randn(ln_f.bias.shape) * 2)
        model.language_model.lm_head.weight[eos] = ln_f.bias * 2
    return model


@pytest.mark.parametrize("eos_ids", [[7], [7, 3], [7, 10_000, -1]])
@pytest.mark.parametrize("length", [2, 5, 6])
def test_eos_suppression_matches_stock_processors(eos_ids, length):
    torch.manual_seed(0)
    scores = torch.randn(6, 50)
    input_ids = torch.zeros(6, length, dtype=torch.long)
    valid = torch.tensor([i for i in eos_ids if 0 <= i < 50])
    stock_new = MinNewTokensLengthLogitsProcessor(2, 4, valid)(input_ids, scores.clone())
    fast_new = EosSuppressionUntilLength(2 + 4, torch.tensor(eos_ids))(input_ids, scores.clone())
    assert torch.equal(stock_new, fast_new)
    stock_min = MinLengthLogitsProcessor(5, valid)(input_ids, scores.clone())
    fast_min = EosSuppressionUntilLength(5, torch.tensor(eos_ids))(input_ids, scores.clone())
    assert torch.equal(stock_min, fast_min)
    # it did something exactly when the sequence is short
    assert torch.isinf(fast_min[:, valid]).all() == (length < 5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_min_new_tokens_same_as_stock(tiny_tokenizer, num_beams):
    model = eos_loving(make_model(len(tiny_tokenizer)))
    eos = model.config.text_config.eos_token_id
    embeds = torch.randn(4, 24)
    kwargs = dict(num_beams=num_beams, max_new_tokens=6, do_sample=False, pad_token_id=eos)
    free = model.generate(image_embeds=embeds, **kwargs)
    assert (free[:, 0] == eos).all(), "the test model should end at once without a minimum length"
    fast = model.generate(
        image_embeds=embeds, min_new_tokens=6, **kwargs, return_dict_in_generate=True, output_scores=True
    )
    model.fast_eos_suppression = False
    stock = model.generate(
        image_embeds=embeds, min_new_tokens=6, **kwargs, return_dict_in_generate=True, output_scores=True
    )
    assert fast.sequences.shape == (4, 6)
    assert not (fast.sequences == eos).any()
    assert torch.equal(fast.sequences, stock.sequences)
    for a, b in zip(fast.scores, stock.scores, strict=True):
        assert torch.equal(a, b)


def test_raw_logits_are_not_written_into(tiny_tokenizer):
    """With ``output_logits`` the stock processors are kept: returned logits are the model's, unmasked."""
    model = eos_loving(make_model(len(tiny_tokenizer)))
    eos = model.config.text_config.eos_token_id
    out = model.generate(
        image_embeds=torch.randn(2, 24), max_new_tokens=3, min_new_tokens=3, pad_token_id=eos,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    assert all(torch.isfinite(step[:, eos]).all() for step in out.logits)


def test_blocked_output_layer_equals_plain_layer(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    vocab = model.config.text_config.vocab_size
    model.cpu_output_layer_block = 8  # several blocks, the last one partial
    assert vocab % 8 != 0
    hidden = torch.randn(3, 5, model.config.text_config.n_embd)
    with torch.no_grad():
        blocked = model._output_layer(hidden)
        plain = model.language_model.lm_head(hidden)
    assert blocked.shape == (3, 5, vocab)
    # the same dot products; a BLAS may pick a different kernel (summation order) for a narrower matrix
    torch.testing.assert_close(blocked, plain, rtol=1e-6, atol=1e-6)
    embeds = torch.randn(3, 24)
    kwargs = dict(max_new_tokens=5, num_beams=2, pad_token_id=0)
    tokens_blocked = model.generate(image_embeds=embeds, **kwargs)
    model.cpu_output_layer_block = None
    assert torch.equal(tokens_blocked, model.generate(image_embeds=embeds, **kwargs))


def test_blocked_output_layer_only_without_gradients(tiny_tokenizer):
    """Training keeps the plain layer: gradients reach the tied embedding through ``lm_head``."""
    model = make_model(len(tiny_tokenizer))
    model.cpu_output_layer_block = 7
    calls = []
    handle = model.language_model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            model._output_layer(torch.randn(2, model.config.text_config.n_embd))
        assert calls == []
        logits = model._output_layer(torch.randn(2, model.config.text_config.n_embd))
        assert calls == [1]
        logits.sum().backward()
        assert model.language_model.lm_head.weight.grad is not None
    finally:
        handle.remove()


def _count_in_place_calls(monkeypatch) -> list[int]:
    """Record each call of the in-place processor (it still runs: this only observes)."""
    calls: list[int] = []
    original = EosSuppressionUntilLength.__call__

    def counted(self, input_ids, scores):
        calls.append(input_ids.shape[-1])
        return original(self, input_ids, scores)

    monkeypatch.setattr(EosSuppressionUntilLength, "__call__", counted)
    return calls


def test_min_length_processors_are_swapped_only_when_safe(tiny_tokenizer, monkeypatch):
    """Through public ``generate`` only: the in-place twin runs by default, never with ``output_logits`` or
    ``fast_eos_suppression = False``, and the tokens are the same in all three cases."""
    model = eos_loving(make_model(len(tiny_tokenizer)))
    eos = model.config.text_config.eos_token_id
    calls = _count_in_place_calls(monkeypatch)
    kwargs = dict(image_embeds=torch.randn(2, 24), max_new_tokens=4, min_new_tokens=3, pad_token_id=eos)
    fast = model.generate(**kwargs)
    assert calls, "generate(min_new_tokens=...) did not use the in-place EOS suppression"
    calls.clear()
    with_logits = model.generate(**kwargs, return_dict_in_generate=True, output_logits=True)
    assert calls == []
    model.fast_eos_suppression = False
    stock = model.generate(**kwargs)
    assert calls == []
    assert torch.equal(fast, stock) and torch.equal(fast, with_logits.sequences)
