"""The core contract of DESIGN.md on tiny configs: construction, loss, decoding, freezing, round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clipcap_config, tiny_text_config, tiny_vision_config

from modeling_clipcap import (
    ClipCapConfig,
    ClipCapForConditionalGeneration,
    ClipCapMLPMapper,
    ClipCapTransformerMapper,
)


def make_model(tokenizer, mapping_type="mlp", with_vision=True, seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_clipcap_config(
        len(tokenizer), mapping_type=mapping_type, with_vision=with_vision, **overrides
    )
    return ClipCapForConditionalGeneration(config).eval()


def caption_batch(tokenizer, captions):
    tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(
        [c + tokenizer.eos_token for c in captions], return_tensors="pt", padding=True, padding_side="right"
    )
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc.input_ids, enc.attention_mask, labels


CAPTIONS = ["a red circle.", "a cat.", "two dogs playing in the park."]


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_the_paper_mlp_variant():
    config = ClipCapConfig()
    assert config.model_type == "clipcap"
    assert config.mapping_type == "mlp" and config.prefix_length == 10
    assert config.vision_config.projection_dim == 512 and config.vision_config.patch_size == 32
    assert config.image_embed_dim == 512 and config.text_config.n_embd == 768
    assert config.freeze_vision and not config.freeze_language_model


def test_config_accepts_dicts_and_round_trips():
    config = ClipCapConfig(
        vision_config=tiny_vision_config().to_dict(),
        text_config=tiny_text_config(50).to_dict(),
        mapping_type="transformer",
        prefix_length=5,
        clip_length=2,
        mapping_num_heads=4,
    )
    again = ClipCapConfig.from_dict(config.to_dict())
    assert again.mapping_type == "transformer" and again.prefix_length == 5 and again.clip_length == 2
    assert again.vision_config.hidden_size == 32 and again.text_config.vocab_size == 50
    assert again.image_embed_dim == 24


def test_embeddings_only_config_round_trips():
    config = ClipCapConfig(vision_config=None, image_embed_dim=640, text_config=tiny_text_config(50))
    assert config.vision_config is None
    again = ClipCapConfig.from_dict(config.to_dict())
    assert again.vision_config is None and again.image_embed_dim == 640


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mapping_type="lstm"), "mapping_type"),
        (dict(prefix_length=0), "prefix_length"),
        (dict(clip_length=-1), "clip_length"),
        (dict(mapping_type="transformer", mapping_num_heads=5), "must divide"),
        (dict(prefix_length=200), "n_positions"),
        (dict(image_embed_dim=99), "projection_dim"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(Exception, match=message):
        ClipCapConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(50), **kwargs)


# ----------------------------------------------------------------------------- mapping networks


def test_mlp_mapper_matches_paper_formula(tiny_tokenizer):
    model = make_model(tiny_tokenizer, "mlp")
    mapper = model.mapping_network
    assert isinstance(mapper, ClipCapMLPMapper)
    k, e, d = 4, 32, 24
    assert mapper.layers[0].weight.shape == (e * k // 2, d) and mapper.layers[2].weight.shape == (
        e * k,
        e * k // 2,
    )
    x = torch.randn(3, d)
    expected = (mapper.layers[2](torch.tanh(mapper.layers[0](x)))).view(3, k, e)
    torch.testing.assert_close(mapper(x), expected)


def reference_transformer_mapper(
    mapper: ClipCapTransformerMapper, x: torch.Tensor, heads: int
) -> torch.Tensor:
    """The paper's transformer mapper written out with einsums (independent of the module's forward)."""
    b = x.shape[0]
    e = mapper.hidden_size
    h = mapper.linear(x).view(b, mapper.clip_length, e)
    h = torch.cat([h, mapper.prefix_const.unsqueeze(0).expand(b, -1, -1)], dim=1)
    for layer in mapper.layers:
        y = F.layer_norm(h, (e,), layer.norm1.weight, layer.norm1.bias)
        n = y.shape[1]
        q = (y @ layer.attn.q_proj.weight.T).reshape(b, n, heads, e // heads)
        kv = (y @ layer.attn.kv_proj.weight.T).reshape(b, n, 2, heads, e // heads)
        keys, values = kv[:, :, 0], kv[:, :, 1]
        att = torch.einsum("bnhd,bmhd->bnmh", q, keys) * (e // heads) ** -0.5
        att = att.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", att, values).reshape(b, n, e)
        h = h + layer.attn.out_proj(out)
        y = F.layer_norm(h, (e,), layer.norm2.weight, layer.norm2.bias)
        h = h + layer.mlp.fc2(F.relu(layer.mlp.fc1(y)))
    return h[:, mapper.clip_length :]


def test_transformer_mapper_matches_paper_formula(tiny_tokenizer):
    model = make_model(tiny_tokenizer, "transformer")
    mapper = model.mapping_network
    assert isinstance(mapper, ClipCapTransformerMapper)
    assert mapper.prefix_const.shape == (4, 32) and len(mapper.layers) == 2
    layer = mapper.layers[0]
    assert layer.attn.q_proj.bias is None and layer.attn.kv_proj.bias is None
    assert layer.attn.out_proj.bias is not None
    assert layer.mlp.fc1.weight.shape == (64, 32)  # MLP ratio 2
    x = torch.randn(3, 24)
    out = mapper(x)
    assert out.shape == (3, 4, 32)
    torch.testing.assert_close(out, reference_transformer_mapper(mapper, x, heads=4), atol=1e-5, rtol=1e-5)


def test_normalize_prefix_normalises_the_clip_embedding(tiny_tokenizer):
    model = make_model(tiny_tokenizer, "mlp", with_vision=False, normalize_prefix=True)
    x = torch.randn(2, 24)
    prefix, _ = model.get_prefix(image_embeds=x * 7.0)
    torch.testing.assert_close(prefix, model.mapping_network(x / x.norm(dim=-1, keepdim=True)))
    plain = make_model(tiny_tokenizer, "mlp", with_vision=False, normalize_prefix=False)
    prefix_plain, _ = plain.get_prefix(image_embeds=x * 7.0)
    torch.testing.assert_close(prefix_plain, plain.mapping_network(x * 7.0))


# ----------------------------------------------------------------------------- forward / loss


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_loss_equals_hand_computed_cross_entropy(tiny_tokenizer, mapping_type):
    model = make_model(tiny_tokenizer, mapping_type)
    input_ids, attention_mask, labels = caption_batch(tiny_tokenizer, CAPTIONS)
    pixel_values = torch.randn(3, 3, 32, 32)
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    k = model.config.prefix_length
    assert out.logits.shape == (3, k + input_ids.shape[1], len(tiny_tokenizer))
    assert out.prefix_embeds.shape == (3, k, 32)

    # by hand: GPT-2 on [prefix ; tokens], position K-1+i predicts token i, padding ignored
    image_embeds = model.vision_model(pixel_values=pixel_values).image_embeds
    prefix = model.mapping_network(image_embeds)
    embeds = torch.cat([prefix, model.language_model.transformer.wte(input_ids)], dim=1)
    mask = torch.cat([torch.ones(3, k, dtype=attention_mask.dtype), attention_mask], dim=1)
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    losses, count = 0.0, 0
    for b in range(3):
        for i in range(input_ids.shape[1]):
            if labels[b, i] == -100:
                continue
            losses += F.cross_entropy(logits[b, k - 1 + i][None], labels[b, i][None], reduction="sum")
            count += 1
    torch.testing.assert_close(out.loss, losses / count, atol=1e-5, rtol=1e-5)


def test_prefix_and_padding_never_count(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    input_ids, attention_mask, labels = caption_batch(tiny_tokenizer, CAPTIONS)
    embeds = torch.randn(3, 24)
    base = model(image_embeds=embeds, input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    # changing the ids under padding positions must not change the loss
    noisy = input_ids.masked_fill(attention_mask == 0, 5)
    again = model(image_embeds=embeds, input_ids=noisy, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(base, again)
    # num_items_in_batch turns the mean into sum / count
    n = int((labels != -100).sum())
    summed = model(
        image_embeds=embeds,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        num_items_in_batch=1,
    ).loss
    torch.testing.assert_close(summed / n, base, atol=1e-5, rtol=1e-5)


def test_logits_to_keep(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    input_ids, attention_mask, labels = caption_batch(tiny_tokenizer, CAPTIONS)
    embeds = torch.randn(3, 24)
    full = model(image_embeds=embeds, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    last = model(
        image_embeds=embeds,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        logits_to_keep=1,
    )
    assert last.logits.shape == (3, 1, len(tiny_tokenizer))
    torch.testing.assert_close(last.logits[:, 0], full.logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.loss, full.loss)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_at_a_time(tiny_tokenizer, mapping_type, num_beams):
    model = make_model(tiny_tokenizer, mapping_type, seed=3)
    pixel_values = torch.randn(4, 3, 32, 32)
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
    batched = model.generate(pixel_values=pixel_values, **kwargs)
    assert batched.shape[0] == 4 and batched.shape[1] <= 8
    eos = model.generation_config.eos_token_id
    for i in range(4):
        single = model.generate(pixel_values=pixel_values[i : i + 1], **kwargs)[0]
        row = batched[i]
        # a finished row is padded after eos in a batch: compare up to the single run's length
        assert torch.equal(row[: single.shape[0]], single), (i, row, single)
        if single.shape[0] < row.shape[0]:
            assert single[-1].item() == eos


def greedy_without_cache(model, image_embeds, steps):
    """Reference greedy decoding: full forward over the growing sequence at every step."""
    prefix, _ = model.get_prefix(image_embeds=image_embeds)
    embeds = prefix
    tokens = []
    for _ in range(steps):
        logits = model.language_model(inputs_embeds=embeds).logits[:, -1]
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        embeds = torch.cat([embeds, model.language_model.transformer.wte(nxt)[:, None]], dim=1)
    return torch.stack(tokens, dim=1)


def test_kv_cached_greedy_equals_uncached_reference(tiny_tokenizer):
    model = make_model(tiny_tokenizer, "transformer", with_vision=False, seed=5)
    embeds = torch.randn(3, 24)
    # no eos stop so all rows run the same number of steps
    out = model.generate(
        image_embeds=embeds, max_new_tokens=7, min_new_tokens=7, do_sample=False, eos_token_id=None
    )
    model.generation_config.eos_token_id = None
    ref = greedy_without_cache(model, embeds, 7)
    assert torch.equal(out, ref)


def test_generation_returns_only_new_tokens_and_stops_at_eos(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=1)
    embeds = torch.randn(2, 24)
    first = model.generate(image_embeds=embeds, max_new_tokens=1, do_sample=False)
    assert first.shape == (2, 1)
    # make the first greedy token the eos: generation must stop after one token
    eos = first[0, 0].item()
    out = model.generate(image_embeds=embeds[:1], max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert out.tolist() == [[eos]]


def test_sampling_and_num_return_sequences(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=2)
    embeds = torch.randn(2, 24)
    torch.manual_seed(0)
    a = model.generate(
        image_embeds=embeds,
        do_sample=True,
        top_k=20,
        top_p=0.9,
        temperature=1.5,
        max_new_tokens=6,
        num_return_sequences=3,
    )
    torch.manual_seed(0)
    b = model.generate(
        image_embeds=embeds,
        do_sample=True,
        top_k=20,
        top_p=0.9,
        temperature=1.5,
        max_new_tokens=6,
        num_return_sequences=3,
    )
    assert a.shape[0] == 6 and torch.equal(a, b)
    beams = model.generate(image_embeds=embeds, num_beams=4, num_return_sequences=2, max_new_tokens=5)
    assert beams.shape[0] == 4


def test_prompt_is_continued_and_returned(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=4)
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    embeds = torch.randn(2, 24)
    prompts = tiny_tokenizer(
        ["a red", "two dogs playing"], return_tensors="pt", padding=True, padding_side="left"
    )
    out = model.generate(
        image_embeds=embeds,
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        max_new_tokens=4,
        min_new_tokens=4,
        eos_token_id=None,
    )
    length = prompts.input_ids.shape[1]
    assert torch.equal(out[:, :length], prompts.input_ids)
    # the padded batch equals each prompt alone (no padding)
    for i, text in enumerate(["a red", "two dogs playing"]):
        ids = tiny_tokenizer(text, return_tensors="pt").input_ids
        single = model.generate(
            image_embeds=embeds[i : i + 1],
            input_ids=ids,
            max_new_tokens=4,
            min_new_tokens=4,
            eos_token_id=None,
        )
        assert torch.equal(single[0, ids.shape[1] :], out[i, length:]), i
        # and equals the prefix-forward of prompt tokens followed by greedy argmax
        logits = model(image_embeds=embeds[i : i + 1], input_ids=ids).logits[0, -1]
        assert logits.argmax().item() == out[i, length].item()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=0), "num_beams"),
        (dict(temperature=0.0, do_sample=True), "temperature"),
        (dict(top_p=1.5, do_sample=True), "top_p"),
        (dict(num_return_sequences=3, num_beams=2), "num_return_sequences"),
        (dict(max_new_tokens=500), "positions"),
    ],
)
def test_bad_generation_arguments(tiny_tokenizer, kwargs, message):
    model = make_model(tiny_tokenizer)
    with pytest.raises(ValueError, match=message):
        model.generate(pixel_values=torch.randn(1, 3, 32, 32), **kwargs)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(), "exactly one"),
        (dict(pixel_values=torch.randn(1, 3, 32, 32), image_embeds=torch.randn(1, 24)), "exactly one"),
        (dict(pixel_values=torch.randn(1, 3, 64, 64)), r"shape \(batch, 3, 32, 32\)"),
        (dict(pixel_values=torch.randn(3, 32, 32)), "shape"),
        (dict(pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), "floating-point"),
        (dict(pixel_values=torch.randn(0, 3, 32, 32)), "empty batch"),
        (dict(image_embeds=torch.randn(2, 25)), r"\(batch, 24\)"),
        (dict(image_embeds=torch.full((2, 24), float("nan"))), "NaN"),
    ],
)
def test_bad_image_inputs(tiny_tokenizer, inputs, message):
    model = make_model(tiny_tokenizer)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2)
    if inputs:
        with pytest.raises(ValueError, match=message):
            model(**inputs)


def test_embeddings_only_model_refuses_pixels(tiny_tokenizer):
    model = make_model(tiny_tokenizer, with_vision=False)
    assert model.vision_model is None
    with pytest.raises(ValueError, match="no vision tower"):
        model.generate(pixel_values=torch.randn(1, 3, 32, 32))
    out = model.generate(image_embeds=torch.randn(2, 24), max_new_tokens=3)
    assert out.shape[0] == 2


# ----------------------------------------------------------------------------- freezing


def one_step(model, tokenizer):
    model.train()
    input_ids, attention_mask, labels = caption_batch(tokenizer, CAPTIONS)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(
        pixel_values=torch.randn(3, 3, 32, 32),
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
    ).loss
    loss.backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    return changed, grads, params


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_frozen_language_model_gets_no_gradients_but_prefix_does(tiny_tokenizer, mapping_type):
    model = make_model(tiny_tokenizer, mapping_type, freeze_language_model=True, freeze_vision=True)
    changed, grads, params = one_step(model, tiny_tokenizer)
    names = {n for n, _ in model.named_parameters()}
    mapper = {n for n in names if n.startswith("model.mapping_network.")}
    assert changed == mapper
    assert not any(grads[n] for n in names - mapper)
    assert {id(p) for p in params} == {id(p) for p in model.mapping_network.parameters()}
    # frozen parts stay in eval mode (no dropout) even after model.train()
    assert model.training and model.mapping_network.training
    assert not model.language_model.training and not model.vision_model.training


def test_fine_tuned_language_model_and_frozen_vision(tiny_tokenizer):
    model = make_model(tiny_tokenizer, freeze_language_model=False, freeze_vision=True)
    changed, grads, _ = one_step(model, tiny_tokenizer)
    assert any(n.startswith("language_model.") for n in changed)
    assert any(n.startswith("model.mapping_network.") for n in changed)
    assert not any(n.startswith("model.vision_model.") for n in changed)
    assert not any(grads[n] for n in grads if n.startswith("model.vision_model."))
    assert model.language_model.training and not model.vision_model.training


def test_unfrozen_vision_trains_too(tiny_tokenizer):
    model = make_model(tiny_tokenizer, freeze_vision=False)
    changed, _, _ = one_step(model, tiny_tokenizer)
    assert any(n.startswith("model.vision_model.") for n in changed)
    assert model.vision_model.training


def test_optimizer_parameter_groups_cover_trainable_parameters(tiny_tokenizer):
    from modeling_clipcap.training_utils import optimizer_parameter_groups

    model = make_model(tiny_tokenizer, freeze_language_model=True)
    groups = optimizer_parameter_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0][0]["params"]
    assert all(p.ndim < 2 or p.shape == model.mapping_network.layers[0].bias.shape for p in no_decay)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_tokenizer):
    input_ids, attention_mask, labels = caption_batch(tiny_tokenizer, CAPTIONS)
    embeds = torch.randn(3, 24)
    grads = []
    for checkpointing in (False, True):
        model = make_model(tiny_tokenizer, "transformer", seed=7)
        model.config.text_config.embd_pdrop = model.config.text_config.resid_pdrop = 0.0
        if checkpointing:
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable()
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        loss = model(
            image_embeds=embeds, input_ids=input_ids, attention_mask=attention_mask, labels=labels
        ).loss
        loss.backward()
        grads.append(model.mapping_network.linear.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- attention / dtype


def test_sdpa_and_eager_agree(tiny_tokenizer, tmp_path):
    model = make_model(tiny_tokenizer)
    model.save_pretrained(tmp_path)
    embeds = torch.randn(2, 24)
    input_ids, attention_mask, _ = caption_batch(tiny_tokenizer, CAPTIONS[:2])
    outs = []
    for impl in ("eager", "sdpa"):
        loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert loaded.language_model.config._attn_implementation == impl
        outs.append(loaded(image_embeds=embeds, input_ids=input_ids, attention_mask=attention_mask).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_dtype_loading(tiny_tokenizer, tmp_path):
    make_model(tiny_tokenizer).save_pretrained(tmp_path)
    model = ClipCapForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.language_model.transformer.wte.weight.dtype == torch.bfloat16
    assert next(model.mapping_network.parameters()).dtype == torch.bfloat16
    out = model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=3)
    assert out.shape[0] == 2


# ----------------------------------------------------------------------------- interpret_prefix


def test_interpret_prefix_returns_nearest_tokens(tiny_tokenizer):
    model = make_model(tiny_tokenizer, with_vision=False)
    embeds = torch.randn(2, 24)
    ids = model.interpret_prefix(image_embeds=embeds)
    assert len(ids) == 2 and all(len(row) == 4 for row in ids)
    prefix, _ = model.get_prefix(image_embeds=embeds)
    wte = model.language_model.transformer.wte.weight
    for b in range(2):
        for k in range(4):
            cos = F.cosine_similarity(prefix[b, k][None], wte, dim=-1)
            assert ids[b][k] == int(cos.argmax())
    words = model.interpret_prefix(image_embeds=embeds, tokenizer=tiny_tokenizer)
    assert words[0][0] == tiny_tokenizer.decode([ids[0][0]])
    top3 = model.interpret_prefix(image_embeds=embeds, top_k=3)
    assert all(
        len(entry) == 3 and entry[0] == ids[b][k] for b, row in enumerate(top3) for k, entry in enumerate(row)
    )
    with pytest.raises(ValueError, match="top_k"):
        model.interpret_prefix(image_embeds=embeds, top_k=0)


# ----------------------------------------------------------------------------- from_vision_text_pretrained


@pytest.mark.parametrize("full_clip", [True, False])
def test_from_vision_text_pretrained(tiny_tokenizer, tmp_path, full_clip):
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionModelWithProjection,
        GPT2LMHeadModel,
    )

    torch.manual_seed(0)
    vision_cfg = tiny_vision_config()
    if full_clip:
        clip = CLIPModel(
            CLIPConfig(
                vision_config=vision_cfg.to_dict(),
                text_config=CLIPTextConfig(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    vocab_size=99,
                ).to_dict(),
                projection_dim=20,
            )
        )
    else:
        clip = CLIPVisionModelWithProjection(vision_cfg)
    clip.save_pretrained(tmp_path / "clip")
    gpt = GPT2LMHeadModel(tiny_text_config(len(tiny_tokenizer))).eval()
    gpt.save_pretrained(tmp_path / "gpt2")

    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        str(tmp_path / "clip"), str(tmp_path / "gpt2"), prefix_length=3, mapping_type="mlp"
    ).eval()
    assert model.config.prefix_length == 3 and model.config.image_embed_dim == (20 if full_clip else 24)
    pixel_values = torch.randn(2, 3, 32, 32)
    expected = (
        clip.get_image_features(pixel_values=pixel_values) if full_clip else clip(pixel_values).image_embeds
    )
    if not torch.is_tensor(expected):
        expected = expected.pooler_output
    torch.testing.assert_close(model.get_image_embeddings(pixel_values).pooler_output, expected)
    torch.testing.assert_close(model.language_model.lm_head.weight, gpt.lm_head.weight)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(
        model.language_model(input_ids=ids).logits, gpt(input_ids=ids).logits, atol=1e-5, rtol=1e-5
    )
    assert not any(p.requires_grad for p in model.vision_model.parameters())


@pytest.mark.parametrize("freeze_language_model", [True, False])
def test_from_pretrained_keeps_the_configured_freezing(tiny_tokenizer, tmp_path, freeze_language_model):
    from transformers import AutoModel

    make_model(tiny_tokenizer, freeze_language_model=freeze_language_model).save_pretrained(tmp_path)
    for loader in (ClipCapForConditionalGeneration.from_pretrained, AutoModel.from_pretrained):
        model = loader(tmp_path)
        assert not any(p.requires_grad for p in model.vision_model.parameters())
        assert all(p.requires_grad for p in model.mapping_network.parameters())
        lm_trainable = {p.requires_grad for p in model.language_model.parameters()}
        assert lm_trainable == {not freeze_language_model}
        model.train()
        assert model.language_model.training is not freeze_language_model and not model.vision_model.training


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=3, max_new_tokens=6),
        dict(num_beams=4, num_return_sequences=2, max_new_tokens=5),
        dict(do_sample=True, num_return_sequences=3, max_new_tokens=5, top_k=10),
    ],
)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_shared_prefix_prefill_equals_plain_generation(tiny_tokenizer, kwargs, with_prompt):
    """generate() prefills [prefix ; prompt] once per image and copies the cache to the beams; the result
    must equal transformers' own generation from the same embeddings (each beam prefilling by itself)."""
    from transformers import GenerationMixin

    from modeling_clipcap.modeling_clipcap import generation_sequence

    model = make_model(tiny_tokenizer, "transformer", seed=11)
    embeds = torch.randn(3, 24)
    input_ids = attention_mask = None
    if with_prompt:
        tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
        enc = tiny_tokenizer(
            ["a red", "two dogs playing", "a"], return_tensors="pt", padding=True, padding_side="left"
        )
        input_ids, attention_mask = enc.input_ids, enc.attention_mask
    torch.manual_seed(0)
    shared = model.generate(image_embeds=embeds, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    prefix, _ = model.get_prefix(image_embeds=embeds)
    prompt_embeds = None if input_ids is None else model.get_input_embeddings()(input_ids)
    inputs_embeds, mask, _, _ = generation_sequence(prefix, prompt_embeds, input_ids, attention_mask)
    prompt = None
    if with_prompt:
        order = torch.sort(attention_mask, dim=1, stable=True).indices
        prompt = torch.gather(input_ids, 1, order)
    torch.manual_seed(0)
    plain = GenerationMixin.generate(
        model, input_ids=prompt, inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs
    )
    assert torch.equal(shared, plain)


def test_from_vision_text_pretrained_refuses_a_vision_checkpoint_without_projection(tiny_tokenizer, tmp_path):
    from transformers import CLIPVisionModel, GPT2LMHeadModel

    CLIPVisionModel(tiny_vision_config()).save_pretrained(tmp_path / "vision")  # no visual_projection
    GPT2LMHeadModel(tiny_text_config(len(tiny_tokenizer))).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="visual_projection"):
        ClipCapForConditionalGeneration.from_vision_text_pretrained(
            str(tmp_path / "vision"), str(tmp_path / "gpt2")
        )
