"""ClipCap answers the calls every transformers model answers, the way transformers' own common model and
generation tests check them (issue 15: one test per point). Tiny configs, no network."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_clipcap_config
from safetensors.torch import load_file, save_file

from modeling_clipcap import ClipCapForConditionalGeneration
from modeling_clipcap.compat import CACHE_KWARG
from modeling_clipcap.modeling_clipcap import ClipCapModel


def make_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    return ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer), **overrides)).eval()


def text_batch(vocab, batch=3, length=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (batch, length), generator=generator)


NO_EOS = dict(eos_token_id=None, pad_token_id=0)  # every row runs max_new_tokens steps


# 1. assisted / speculative decoding with an assistant model (prompt lookup is allowed: test_transformers_conventions)
def test_assisted_decoding_with_an_assistant_is_refused_clearly(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    pixel_values = torch.randn(1, 3, 32, 32)
    for kwargs in ({"assistant_model": make_model(tiny_tokenizer, seed=1)}, {"assistant_early_exit": 1}):
        with pytest.raises(ValueError, match="assisted / speculative decoding with an assistant model"):
            model.generate(pixel_values=pixel_values, max_new_tokens=3, **kwargs)
    model.generation_config.assistant_early_exit = 1  # also when it comes from the saved generation config
    with pytest.raises(ValueError, match="assistant_early_exit"):
        model.generate(pixel_values=pixel_values, max_new_tokens=3)


# 2. positions: left padding, with or without position_ids
@pytest.mark.parametrize("with_position_ids", [False, True])
def test_left_padding_gives_the_logits_of_no_padding(tiny_tokenizer, with_position_ids):
    model = make_model(tiny_tokenizer, with_vision=False)
    embeds, ids = torch.randn(2, 24), text_batch(len(tiny_tokenizer), batch=2, length=5)
    mask = torch.ones_like(ids)
    unpadded = model(image_embeds=embeds, input_ids=ids, attention_mask=mask).logits[:, -1]
    pad = 3
    padded_ids = torch.cat([torch.full((2, pad), 7), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), mask], dim=1)
    kwargs = {}
    if with_position_ids:  # what generate and users compute: cumulative sum of the text mask
        kwargs["position_ids"] = (padded_mask.cumsum(-1) - 1).masked_fill(padded_mask == 0, 1)
    padded = model(image_embeds=embeds, input_ids=padded_ids, attention_mask=padded_mask, **kwargs).logits[
        :, -1
    ]
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="position_ids"):
        model(image_embeds=embeds, input_ids=ids, position_ids=torch.zeros(2, 2, dtype=torch.long))


# 3. return_dict=False
def test_return_dict_false_gives_the_tuple_of_the_output(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    inputs = dict(pixel_values=torch.randn(2, 3, 32, 32), input_ids=text_batch(len(tiny_tokenizer), batch=2))
    as_dict = model(**inputs, labels=inputs["input_ids"], output_hidden_states=True)
    as_tuple = model(**inputs, labels=inputs["input_ids"], output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected):
        if torch.is_tensor(want):
            torch.testing.assert_close(got, want)
        elif isinstance(want, tuple):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)


# 4. get_image_features returns the v5 output object: the prefix as pooler_output, the tower's states
#    (get_image_embeddings gives the image embedding itself; return_dict from the config: test_transformers_conventions)
def test_get_image_features_output_object(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    model.set_attn_implementation("eager")  # attention weights exist only outside the fused kernels
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
    vc, k, e = model.config.vision_config, model.config.prefix_length, model.config.text_config.n_embd
    assert out.pooler_output.shape == (2, k, e)
    torch.testing.assert_close(out.pooler_output, model.get_prefix(pixel_values=pixel_values)[0])
    patches = (vc.image_size // vc.patch_size) ** 2 + 1
    assert out.last_hidden_state.shape == (2, patches, vc.hidden_size)
    assert len(out.hidden_states) == vc.num_hidden_layers + 1
    assert len(out.attentions) == vc.num_hidden_layers
    assert out.attentions[0].shape == (2, vc.num_attention_heads, patches, patches)
    plain = model.get_image_features(pixel_values)
    assert plain.hidden_states is None and plain.attentions is None
    as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], out.pooler_output)
    embeddings = model.get_image_embeddings(pixel_values)
    assert embeddings.pooler_output.shape == (2, model.config.image_embed_dim)
    torch.testing.assert_close(embeddings.pooler_output, model.vision_model(pixel_values).image_embeds)
    torch.testing.assert_close(embeddings.last_hidden_state, out.last_hidden_state)


# 5. inputs_embeds with an image
def test_text_as_inputs_embeds_follows_the_prefix_like_input_ids(tiny_tokenizer):
    model = make_model(tiny_tokenizer, with_vision=False)
    embeds, ids = torch.randn(2, 24), text_batch(len(tiny_tokenizer), batch=2)
    text_embeds = model.get_input_embeddings()(ids)
    from_ids = model(image_embeds=embeds, input_ids=ids, labels=ids)
    from_embeds = model(image_embeds=embeds, inputs_embeds=text_embeds, labels=ids)
    torch.testing.assert_close(from_embeds.logits, from_ids.logits)
    torch.testing.assert_close(from_embeds.loss, from_ids.loss)
    with pytest.raises(ValueError, match="not both"):
        model(image_embeds=embeds, input_ids=ids, inputs_embeds=text_embeds)


# 6. generate's first positional argument
def test_generate_positional_argument_is_the_text_prompt(tiny_tokenizer):
    model = make_model(tiny_tokenizer, with_vision=False)
    embeds, prompt = torch.randn(2, 24), text_batch(len(tiny_tokenizer), batch=2, length=3)
    kwargs = dict(image_embeds=embeds, max_new_tokens=4, do_sample=False, **NO_EOS)
    positional = model.generate(prompt, **kwargs)
    keyword = model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(positional, keyword) and torch.equal(positional[:, :3], prompt)
    with pytest.raises(TypeError, match="pixel_values="):
        model.generate(torch.randn(2, 3, 32, 32), max_new_tokens=2)


# 7. use_cache=False and dict outputs, for the four strategies
@pytest.mark.parametrize(
    "strategy",
    [dict(), dict(do_sample=True, top_k=5), dict(num_beams=2), dict(num_beams=2, do_sample=True, top_k=5)],
    ids=["greedy", "sample", "beam", "beam_sample"],
)
def test_use_cache_false_and_dict_outputs(tiny_tokenizer, strategy):
    model = make_model(tiny_tokenizer, with_vision=False, seed=2)
    model.set_attn_implementation("eager")  # attention weights exist only outside the fused kernels
    embeds, new = torch.randn(2, 24), 3
    kwargs = dict(image_embeds=embeds, max_new_tokens=new, min_new_tokens=new, **NO_EOS, **strategy)
    dict_kwargs = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(0)
    cached = model.generate(**kwargs, use_cache=True, **dict_kwargs)
    torch.manual_seed(0)
    uncached = model.generate(**kwargs, use_cache=False, **dict_kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    rows = 2 * strategy.get("num_beams", 1)
    vocab = len(tiny_tokenizer)
    assert cached.sequences.shape == (2, new)
    for out in (cached, uncached):
        assert len(out.scores) == len(out.logits) == new
        assert all(s.shape == (rows, vocab) for s in out.scores + out.logits)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b)
    k, tc = model.config.prefix_length, model.config.text_config
    outputs = {}
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs[use_cache] = model.generate(
            **kwargs,
            return_dict_in_generate=True,
            output_hidden_states=True,
            output_attentions=True,
            use_cache=use_cache,
        )
    full = outputs[False]
    assert torch.equal(full.sequences, outputs[True].sequences)
    assert len(full.hidden_states) == len(full.attentions) == new
    # GIT's convention: without a cache, every step re-runs the whole sequence, prefix included
    for step, (states, attentions) in enumerate(zip(full.hidden_states, full.attentions)):
        assert len(states) == tc.n_layer + 1 and len(attentions) == tc.n_layer
        assert all(h.shape == (rows, k + step, tc.n_embd) for h in states)
        assert all(a.shape == (rows, tc.n_head, k + step, k + step) for a in attentions)
    # ... and computes the same states as the cached steps (which cover the new position only)
    for step in range(new):
        for cached, uncached in zip(outputs[True].hidden_states[step], full.hidden_states[step]):
            assert cached.shape[1] == (k if step == 0 else 1)
            torch.testing.assert_close(cached[:, -1], uncached[:, -1], rtol=1e-4, atol=1e-5)


# 8. continue from a returned cache
def test_generation_continues_from_a_returned_cache(tiny_tokenizer):
    model = make_model(tiny_tokenizer, with_vision=False, seed=4)
    embeds = torch.randn(2, 24)
    kwargs = dict(
        image_embeds=embeds, do_sample=False, return_dict_in_generate=True, output_scores=True, **NO_EOS
    )
    at_once = model.generate(**kwargs, max_new_tokens=5)
    first = model.generate(**kwargs, max_new_tokens=3)
    cache = getattr(first, CACHE_KWARG)
    assert cache is not None
    attention_mask = torch.ones_like(first.sequences)
    second = model.generate(
        **kwargs,
        input_ids=first.sequences,
        attention_mask=attention_mask,
        max_new_tokens=2,
        # the installed release's name (the old one warns: test_transformers_conventions)
        **{CACHE_KWARG: cache},
    )
    assert torch.equal(second.sequences, at_once.sequences)
    for a, b in zip(first.scores + second.scores, at_once.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # without the image, as LLaVA continues: the cache holds the prefix already
    first = model.generate(**kwargs, max_new_tokens=3)
    no_image = {k: v for k, v in kwargs.items() if k != "image_embeds"}
    second = model.generate(
        **no_image, input_ids=first.sequences, max_new_tokens=2, **{CACHE_KWARG: getattr(first, CACHE_KWARG)}
    )
    assert torch.equal(second.sequences, at_once.sequences)
    for a, b in zip(first.scores + second.scores, at_once.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# 9. weights missing from a checkpoint get the init of a fresh model
def test_missing_weights_get_the_init_of_from_config(tiny_tokenizer, tmp_path):
    config = tiny_clipcap_config(len(tiny_tokenizer))
    config.text_config.initializer_range = 0.3  # GPT-2's own rule, far from a generic 0.02
    config.vision_config.initializer_factor = 5.0  # CLIP's own rule
    fresh = ClipCapForConditionalGeneration(config)
    fresh.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [
        "language_model.transformer.h.0.mlp.c_fc.weight",
        "vision_model.vision_model.encoder.layers.0.mlp.fc1.weight",
    ]
    assert all(k in weights for k in dropped)
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(tmp_path / "model.safetensors"))
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path)
    for saved_name, param in (
        (dropped[0], loaded.language_model.transformer.h[0].mlp.c_fc.weight),
        (dropped[1], loaded.vision_model.vision_model.encoder.layers[0].mlp.fc1.weight),
    ):
        reference = fresh.get_parameter(re.sub(r"^vision_model\.", "model.vision_model.", saved_name))
        assert not torch.equal(param, reference)  # re-initialised, not loaded
        assert abs(param.std().item() - reference.std().item()) < 0.2 * reference.std().item(), saved_name


# 10. the loss comes from self.loss_function: shift_labels, num_items_in_batch, ignore_index
def test_loss_function_options(tiny_tokenizer):
    model = make_model(tiny_tokenizer, with_vision=False)
    embeds, ids = torch.randn(2, 24), text_batch(len(tiny_tokenizer), batch=2)
    out = model(image_embeds=embeds, input_ids=ids)
    k = model.config.prefix_length
    log_probs = out.logits.float().log_softmax(-1)
    # shift_labels: the target of each text position (the next token), -100 at the end
    shift = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    by_hand = -log_probs[:, k:-1].gather(-1, ids[:, 1:, None]).mean()
    shifted = model(image_embeds=embeds, input_ids=ids, shift_labels=shift).loss
    torch.testing.assert_close(shifted, by_hand)
    with_labels = model(image_embeds=embeds, input_ids=ids, labels=ids).loss
    assert not torch.allclose(shifted, with_labels)  # labels also score the token after the prefix
    summed = model(image_embeds=embeds, input_ids=ids, shift_labels=shift, num_items_in_batch=1).loss
    torch.testing.assert_close(summed, by_hand * shift[:, :-1].numel())
    ignored = ids.clone()
    ignored[:, 2:] = 5  # token 5 as the ignore index: only the first two tokens count
    custom = model(image_embeds=embeds, input_ids=ids, labels=ignored, ignore_index=5).loss
    first_two = -log_probs[:, k - 1 : k + 1].gather(-1, ids[:, :2, None]).mean()
    torch.testing.assert_close(custom, first_two)
    calls = []
    model.loss_function = lambda **kw: calls.append(kw) or torch.tensor(0.0)
    model(image_embeds=embeds, input_ids=ids, labels=ids)
    assert len(calls) == 1 and torch.equal(calls[0]["shift_labels"], ids)


# 11. base_model_prefix names the base; checkpoints of the 0.1.0 layout load unchanged
def test_base_model_and_old_checkpoint_layout(tiny_tokenizer, tmp_path):
    model = make_model(tiny_tokenizer)
    assert isinstance(model.base_model, ClipCapModel) and model.base_model is model.model
    assert model.vision_model is model.model.vision_model
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    # the file keeps the 0.1.0 layout, so older releases of this code (remote code) still read it
    assert any(k.startswith("mapping_network.") for k in saved)
    assert any(k.startswith("vision_model.") for k in saved)
    assert not any(k.startswith("model.") for k in saved)
    loaded, info = ClipCapForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = dict(pixel_values=torch.randn(2, 3, 32, 32), input_ids=text_batch(len(tiny_tokenizer), batch=2))
    torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits)
    base = ClipCapModel.from_pretrained(tmp_path)  # the base alone, from the full checkpoint
    torch.testing.assert_close(
        base(image_embeds=torch.ones(1, 24)).prefix_embeds,
        model.model(image_embeds=torch.ones(1, 24)).prefix_embeds,
    )
