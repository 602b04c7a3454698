"""The model and generation conventions transformers 5.25's common tests (ModelTesterMixin, GenerationTesterMixin)
check of a multimodal model, each checked here on ClipCap the way those tests check it (issue 23, point 3), for both
mapping networks. Where a prefix model legitimately differs, the check is prefix-aware, as transformers' own GIT
tests are: the K prefix positions count in sequence lengths. Tiny configs, no network."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_clipcap_config
from transformers import DynamicCache
from transformers.generation import candidate_generator
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

import modeling_clipcap.modeling_clipcap as modeling
from modeling_clipcap import ClipCapForConditionalGeneration
from modeling_clipcap.compat import CACHE_KWARG, output_cache
from modeling_clipcap.modeling_clipcap import ClipCapModel

MAPPERS = ["mlp", "transformer"]
NO_EOS = dict(eos_token_id=None, pad_token_id=0)  # every row runs max_new_tokens steps
GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True, **NO_EOS)


def make_model(tokenizer, mapping_type="mlp", seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_clipcap_config(len(tokenizer), mapping_type=mapping_type, **overrides)
    return ClipCapForConditionalGeneration(config).eval()


def pixels(batch=2, seed=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def left_padded_prompt():
    """Two prompts, the first left-padded by one (pad id 0): ids (2, 4) and mask (2, 4)."""
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    return ids, mask


def assert_scores_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# 1. generate(pixel_values=..., inputs_embeds=...): the text as embeddings after the image prefix (as LLaVA takes it)
@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_generate_takes_the_prompt_as_inputs_embeds_after_the_image(tiny_tokenizer, mapping_type):
    model = make_model(tiny_tokenizer, mapping_type)
    ids, mask = left_padded_prompt()
    embeds = model.get_input_embeddings()(ids)
    kwargs = dict(pixel_values=pixels(), attention_mask=mask, max_new_tokens=4, **GREEDY)
    from_ids = model.generate(input_ids=ids, **kwargs)
    from_embeds = model.generate(inputs_embeds=embeds, **kwargs)
    # the decoder-only convention: given only embeddings, the result holds only the new tokens
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, ids.shape[1] :])
    assert_scores_close(from_embeds.logits, from_ids.logits)
    both = model.generate(
        input_ids=ids, inputs_embeds=embeds, **kwargs
    )  # ids only name the prompt in the result
    assert torch.equal(both.sequences, from_ids.sequences)
    uncached = model.generate(inputs_embeds=embeds, use_cache=False, **kwargs)
    assert torch.equal(uncached.sequences, from_embeds.sequences)
    with pytest.raises(ValueError, match="same prompt"):
        model.generate(input_ids=ids[:, 1:], inputs_embeds=embeds, pixel_values=pixels(), max_new_tokens=2)


# 2. generate(position_ids=...): text positions, shifted behind the prefix as forward shifts them
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_generate_shifts_given_position_ids_as_forward_does(tiny_tokenizer, mapping_type, use_cache):
    model = make_model(tiny_tokenizer, mapping_type, with_vision=False, seed=5)
    image_embeds = torch.randn(2, 24, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    offset, new = 7, 3  # text positions 7, 8, ...: not the defaults, so a dropped or unshifted id shows
    positions = torch.arange(offset, offset + 3).expand(2, -1)
    kwargs = dict(image_embeds=image_embeds, input_ids=ids, max_new_tokens=new, use_cache=use_cache, **GREEDY)
    out = model.generate(position_ids=positions, **kwargs)
    # each step's logits are forward's on the sequence so far, its given positions continued one by one
    for step in range(new):
        sequence = out.sequences[:, : 3 + step]
        step_positions = torch.arange(offset, offset + 3 + step).expand(2, -1)
        expected = model(image_embeds=image_embeds, input_ids=sequence, position_ids=step_positions).logits
        torch.testing.assert_close(out.logits[step], expected[:, -1], rtol=1e-5, atol=1e-5)
    default = model.generate(**kwargs)
    assert not torch.allclose(default.logits[0], out.logits[0], atol=1e-4)  # the positions were used
    # forward alone, with or without a cache: text positions that do not start at 0 still follow the prefix
    # (transformers reads such a jump as another packed sequence when it has neither a mask nor a cache)
    with torch.no_grad():
        forward = [
            model(image_embeds=image_embeds, input_ids=ids, position_ids=positions, use_cache=flag).logits
            for flag in (True, False)
        ]
    torch.testing.assert_close(forward[0], forward[1])
    # forward's own convention for a left-padded prompt (cumulative sum of the mask) gives the unpadded result
    padded, mask = left_padded_prompt()
    mask_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    pad_kwargs = dict(kwargs, input_ids=padded, attention_mask=mask)
    with_positions = model.generate(position_ids=mask_positions, **pad_kwargs)
    without = model.generate(**pad_kwargs)
    assert torch.equal(with_positions.sequences, without.sequences)
    assert_scores_close(with_positions.logits, without.logits)
    alone = model.generate(**dict(kwargs, image_embeds=image_embeds[:1], input_ids=padded[:1, 1:]))
    assert_scores_close([s[:1] for s in with_positions.logits], alone.logits)


# 3. continue a generation from its returned cache, without passing the image again (as LLaVA continues)
@pytest.mark.parametrize("with_prompt", [False, True], ids=["no_prompt", "padded_prompt"])
@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_generation_continues_from_a_cache_without_the_image(tiny_tokenizer, mapping_type, with_prompt):
    model = make_model(tiny_tokenizer, mapping_type, seed=4)
    start = {}
    if with_prompt:
        ids, mask = left_padded_prompt()
        start = dict(input_ids=ids, attention_mask=mask)
    at_once = model.generate(pixel_values=pixels(), **start, max_new_tokens=5, **GREEDY)
    first = model.generate(pixel_values=pixels(), **start, max_new_tokens=3, **GREEDY)
    cache = output_cache(first)
    assert cache.get_seq_length() == model.config.prefix_length + first.sequences.shape[1] - 1
    mask = None
    if with_prompt:
        mask = torch.cat([start["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    second = model.generate(
        input_ids=first.sequences, attention_mask=mask, max_new_tokens=2, **{CACHE_KWARG: cache}, **GREEDY
    )
    assert torch.equal(second.sequences, at_once.sequences)
    assert_scores_close(first.logits + second.logits, at_once.logits)
    # a cache that does not hold the prefix cannot stand for the image: a clear error, not other captions
    with pytest.raises(ValueError, match="pass `pixel_values` or `image_embeds`"):
        model.generate(input_ids=first.sequences, max_new_tokens=2, **{CACHE_KWARG: DynamicCache()}, **NO_EOS)
    with pytest.raises(ValueError, match="as `input_ids`"):
        model.generate(max_new_tokens=2, **{CACHE_KWARG: output_cache(first)}, **NO_EOS)


# 4. generate(use_cache=False): no cache at all, not even the shared prefill; every step sees the whole sequence
@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_use_cache_false_runs_the_whole_sequence_at_every_step(tiny_tokenizer, mapping_type, monkeypatch):
    model = make_model(tiny_tokenizer, mapping_type, seed=2)
    prefills = []
    shared_prefill = modeling.prefill_shared_prefix
    monkeypatch.setattr(
        modeling, "prefill_shared_prefix", lambda *a, **k: prefills.append(1) or shared_prefill(*a, **k)
    )
    steps = []

    def record(module, args, kwargs):
        text = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        steps.append((kwargs.get("use_cache"), kwargs.get(CACHE_KWARG), text.shape[1]))

    model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    prompt = torch.tensor([[5, 6], [7, 8]])
    k, new = model.config.prefix_length, 3
    kwargs = dict(pixel_values=pixels(), input_ids=prompt, num_beams=2, max_new_tokens=new, **NO_EOS)
    cached = model.generate(**kwargs)
    assert prefills, "the spy must see the shared prefill where it runs"
    prefills.clear()
    steps.clear()
    uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(uncached, cached)
    assert not prefills
    assert [length for _, _, length in steps] == [
        k + 2 + i for i in range(new)
    ]  # prefix + prompt + tokens so far
    assert all(use_cache is False and cache is None for use_cache, cache, _ in steps)


# 5. get_image_features / get_image_embeddings honour config.return_dict (can_return_tuple)
@pytest.mark.parametrize("return_dict", [True, False, None])
def test_image_feature_methods_follow_config_return_dict(tiny_tokenizer, return_dict):
    config = tiny_clipcap_config(len(tiny_tokenizer))
    if return_dict is not None:
        config.return_dict = return_dict
    torch.manual_seed(0)
    full = ClipCapForConditionalGeneration(config).eval()
    base = ClipCapModel(config).eval()
    hidden = config.vision_config.hidden_size
    for method in (full.get_image_features, full.get_image_embeddings, base.get_image_features,
                   base.get_image_embeddings):  # fmt: skip
        out = method(pixels())
        if return_dict is False:
            assert isinstance(out, tuple) and not isinstance(out, ModelOutput), method
            assert isinstance(
                method(pixels(), return_dict=True), BaseModelOutputWithPooling
            )  # the keyword wins
        else:
            assert isinstance(out, BaseModelOutputWithPooling), method
            assert out.last_hidden_state.shape[0] == 2 and out.last_hidden_state.shape[-1] == hidden
            assert isinstance(method(pixels(), return_dict=False), tuple)


# 6. get_image_features(...).pooler_output is what the language model consumes: the prefix, 2-D per sample
@pytest.mark.parametrize(
    "mapping_type, mapping_input", [("mlp", "pooled"), ("transformer", "pooled"), ("transformer", "tokens")]
)
def test_get_image_features_pooler_output_is_the_prefix(tiny_tokenizer, mapping_type, mapping_input):
    model = make_model(tiny_tokenizer, mapping_type, mapping_input=mapping_input)
    pixel_values, ids = pixels(), torch.tensor([[5, 6, 7], [8, 9, 10]])
    k, e = model.config.prefix_length, model.config.text_config.n_embd
    with torch.no_grad():
        features = model.get_image_features(pixel_values)
        assert len(features.pooler_output) == 2 and features.pooler_output[0].ndim == 2
        assert features.pooler_output.shape == (2, k, e)
        # the language model on [pooler_output ; text] gives the model's own logits
        lm_input = torch.cat([features.pooler_output, model.get_input_embeddings()(ids)], dim=1)
        torch.testing.assert_close(
            model.language_model(inputs_embeds=lm_input).logits,
            model(pixel_values=pixel_values, input_ids=ids).logits,
        )
        # the image embedding, the documented way: get_image_embeddings, whose output image_embeds= takes
        embeddings = model.get_image_embeddings(pixel_values)
        assert embeddings.pooler_output.shape == (2, model.config.vision_config.projection_dim)
        image_embeds = embeddings.last_hidden_state if mapping_input == "tokens" else embeddings.pooler_output
        torch.testing.assert_close(model.get_prefix(image_embeds=image_embeds)[0], features.pooler_output)
    kwargs = dict(max_new_tokens=3, **NO_EOS)
    assert torch.equal(
        model.generate(image_embeds=image_embeds, **kwargs),
        model.generate(pixel_values=pixel_values, **kwargs),
    )


@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_get_image_features_gives_the_towers_hidden_states_and_attentions(tiny_tokenizer, mapping_type):
    """As transformers' test_get_image_features_hidden_states / _attentions: by keyword and by config, features
    unchanged by asking for hidden states."""
    vc = tiny_clipcap_config(len(tiny_tokenizer)).vision_config
    model = make_model(tiny_tokenizer, mapping_type)
    model.set_attn_implementation("eager")
    pixel_values = pixels()
    plain = model.get_image_features(pixel_values)
    asked = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None
    assert (
        len(asked.hidden_states) == vc.num_hidden_layers + 1 and len(asked.attentions) == vc.num_hidden_layers
    )
    torch.testing.assert_close(asked.pooler_output, plain.pooler_output)
    torch.testing.assert_close(asked.last_hidden_state, plain.last_hidden_state)
    config = copy.deepcopy(model.config)
    for sub in (config, config.vision_config, config.text_config):
        sub.output_hidden_states = True
        sub.output_attentions = True
    by_config = ClipCapForConditionalGeneration(config).eval()
    by_config.set_attn_implementation("eager")
    out = by_config.get_image_features(pixel_values)
    assert len(out.hidden_states) == vc.num_hidden_layers + 1 and len(out.attentions) == vc.num_hidden_layers


# 7. forward outputs carry the tower's image_outputs
@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_forward_outputs_carry_the_image_outputs(tiny_tokenizer, mapping_type):
    model = make_model(tiny_tokenizer, mapping_type)
    model.set_attn_implementation("eager")  # as transformers' test_multimodal_outputs_are_returned
    vc, tc = model.config.vision_config, model.config.text_config
    pixel_values, ids = pixels(), torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        out = model(
            pixel_values=pixel_values, input_ids=ids, output_attentions=True, output_hidden_states=True
        )
        image = out.image_outputs
        assert len(image.pooler_output) == 2
        torch.testing.assert_close(
            image.pooler_output, model.get_image_embeddings(pixel_values).pooler_output
        )
        assert (
            len(image.hidden_states) == vc.num_hidden_layers + 1
            and len(image.attentions) == vc.num_hidden_layers
        )
        # the output's own hidden states stay the language model's, over prefix + text
        assert len(out.hidden_states) == tc.n_layer + 1
        assert out.hidden_states[0].shape == (2, model.config.prefix_length + 3, tc.n_embd)
        plain = model(pixel_values=pixel_values, input_ids=ids).image_outputs
        assert plain.hidden_states is None and plain.attentions is None and plain.pooler_output is not None
        from_embeds = model(image_embeds=image.pooler_output, input_ids=ids)
        assert from_embeds.image_outputs is None  # no tower ran
        torch.testing.assert_close(from_embeds.logits, out.logits)
        as_tuple = model(pixel_values=pixel_values, input_ids=ids, return_dict=False)
        assert any(isinstance(item, BaseModelOutputWithPooling) for item in as_tuple)


# 8. past_key_values= in forward: a FutureWarning naming `cache` where transformers renamed it (>= 5.24), else none
@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_past_key_values_is_accepted_with_the_deprecation_of_the_installed_release(
    tiny_tokenizer, mapping_type
):
    """As transformers' test_bc_cache_name_forward: the old name gives the cache the new name gives."""
    model = make_model(tiny_tokenizer, mapping_type)
    inputs = dict(pixel_values=pixels(), input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True)
    with torch.no_grad():
        assert type(output_cache(model(**inputs))) is DynamicCache
        empty = DynamicCache(config=model.config.get_text_config(decoder=True))
        if CACHE_KWARG == "cache":
            with pytest.warns(FutureWarning, match="`past_key_values` is deprecated") as record:
                old = model(**inputs, past_key_values=copy.deepcopy(empty))
            assert any("Use `cache` instead" in str(w.message) for w in record)
        else:  # before the rename, past_key_values is the current name: no warning at all
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                old = model(**inputs, past_key_values=copy.deepcopy(empty))
        new = model(**inputs, **{CACHE_KWARG: copy.deepcopy(empty)})
    assert output_cache(old).get_seq_length() == output_cache(new).get_seq_length() > 0
    torch.testing.assert_close(old.logits, new.logits)
    # our own calls never use the old name: generate and a continued generate run with every warning an error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = model.generate(
            pixel_values=pixels(), max_new_tokens=2, return_dict_in_generate=True, **NO_EOS
        )
        model.generate(
            input_ids=first.sequences, max_new_tokens=2, **{CACHE_KWARG: output_cache(first)}, **NO_EOS
        )
        model.generate(pixel_values=pixels(), max_new_tokens=2, num_beams=2, **NO_EOS)
    # generate takes the old name as transformers' generate does
    first = model.generate(pixel_values=pixels(), max_new_tokens=2, return_dict_in_generate=True, **NO_EOS)
    legacy = dict(input_ids=first.sequences, max_new_tokens=1, past_key_values=output_cache(first), **NO_EOS)
    if CACHE_KWARG == "cache":
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            model.generate(**legacy)
    else:
        model.generate(**legacy)


# prompt lookup decoding: drafts from the ids, verified with the prefix: the tokens of greedy decoding
@pytest.mark.parametrize("padded", [False, True], ids=["prompt", "left_padded_prompt"])
@pytest.mark.parametrize("mapping_type", MAPPERS)
def test_prompt_lookup_gives_the_tokens_of_greedy_decoding(tiny_tokenizer, mapping_type, padded, monkeypatch):
    drafts = []
    get_candidates = candidate_generator.PromptLookupCandidateGenerator.get_candidates

    def spy(self, input_ids, *args, **kwargs):
        candidates = get_candidates(self, input_ids, *args, **kwargs)
        drafts.append(candidates[0].shape[1] - input_ids.shape[1])
        return candidates

    monkeypatch.setattr(candidate_generator.PromptLookupCandidateGenerator, "get_candidates", spy)
    model = make_model(tiny_tokenizer, mapping_type, seed=1)
    prompt = torch.tensor(
        [[5, 6, 7, 8, 5, 6]]
    )  # ends with "5 6", seen before: drafts "7 8 5" at the first step
    mask = torch.ones_like(prompt)
    if padded:
        prompt = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], dim=1)
        mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), mask], dim=1)
    kwargs = dict(pixel_values=pixels(1), input_ids=prompt, attention_mask=mask, max_new_tokens=10, **GREEDY)
    greedy = model.generate(**kwargs)
    assert not drafts
    lookup = model.generate(**kwargs, prompt_lookup_num_tokens=3)
    assert drafts[0] == 3 and sum(drafts) > 3, drafts  # drafts before the first forward, and later ones
    assert torch.equal(lookup.sequences, greedy.sequences)
    assert_scores_close(lookup.scores, greedy.scores)
