"""Any image tower x any causal LM (issue 16): every supported family with tiny random configs.

Each vision family is paired with a tiny GPT-2 and each language-model family with a tiny CLIP tower. Models are
built once per module; every test checks a part of DESIGN.md's contract for every family: a training step
moves the mapper, batched generation equals one image at a time (greedy and beam), the KV cache and prompts
behave, the CPU speed paths give the stock tokens, and a saved model gives the same tokens through
``AutoModel`` and through ``trust_remote_code`` without the package.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CORPUS, build_tiny_tokenizer, tiny_text_config, tiny_vision_config
from test_auto_and_remote import run_without_package
from transformers import AutoConfig, AutoModel

from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration
from modeling_clipcap.towers import FAST_PATH_LANGUAGE_FAMILIES, VISION_FAMILIES

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
CNN = dict(hidden_sizes=[8, 16], depths=[1, 1])
VISION = {
    "clip_vision_model": None,  # conftest's tiny CLIP tower
    "siglip_vision_model": dict(VIT, image_size=32, patch_size=8),
    "siglip2_vision_model": dict(VIT, num_patches=16, patch_size=8),
    "dinov2": dict(VIT, image_size=32, patch_size=8),
    "vit": dict(VIT, image_size=32, patch_size=8),
    "convnext": dict(CNN, num_stages=2),
    "convnextv2": dict(CNN, num_stages=2),
    "resnet": dict(CNN, embedding_size=8),
}
DECODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128)
ROPE = dict(DECODER, intermediate_size=64, num_key_value_heads=1, head_dim=16)
LANGUAGE = {
    "gpt2": None,  # conftest's tiny GPT-2
    "llama": ROPE,
    "qwen2": ROPE,
    "qwen3": ROPE,
    "opt": dict(DECODER, ffn_dim=64, word_embed_proj_dim=16),  # embeddings narrower than the body
    "gpt_neox": dict(DECODER, intermediate_size=64),
    "gemma": ROPE,
}


def vision_config(family: str):
    return tiny_vision_config() if VISION[family] is None else AutoConfig.for_model(family, **VISION[family])


def text_config(family: str, vocab: int):
    if LANGUAGE[family] is None:
        return tiny_text_config(vocab)
    ids = dict(bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=0)
    return AutoConfig.for_model(family, vocab_size=vocab, **LANGUAGE[family], **ids)


def build(
    vision: str, language: str, vocab: int, seed: int = 0, **overrides
) -> ClipCapForConditionalGeneration:
    torch.manual_seed(seed)
    kwargs = dict(prefix_length=4, clip_length=3, mapping_num_layers=1, mapping_num_heads=4)
    kwargs.update(overrides)
    config = ClipCapConfig(
        vision_config=vision_config(vision), text_config=text_config(language, vocab), **kwargs
    )
    return ClipCapForConditionalGeneration(config).eval()


def image_inputs(family: str, batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """What the family's image processor gives for ``batch`` images (SigLIP2: NaFlex patches, mask and shapes):
    noise around a brightness that changes from image to image (+1, -1, 0, +1, ...), so that even random towers
    tell them apart."""
    g = torch.Generator().manual_seed(seed)
    brightness = torch.tensor([(1.0, -1.0, 0.0)[i % 3] for i in range(batch)])
    if family == "siglip2_vision_model":
        mask = torch.ones(batch, 16, dtype=torch.long)
        mask[1::2, 12:] = 0  # every other image uses 12 of the 16 patch slots
        shapes = torch.tensor([[4, 4] if i % 2 == 0 else [3, 4] for i in range(batch)])
        return dict(
            pixel_values=torch.randn(batch, 16, 3 * 64, generator=g) + brightness.view(-1, 1, 1),
            pixel_attention_mask=mask,
            spatial_shapes=shapes,
        )
    return dict(pixel_values=torch.randn(batch, 3, 32, 32, generator=g) + brightness.view(-1, 1, 1, 1))


def rows(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in inputs.items()}


#: TINY_CORPUS's eight sentences, the first three differing from their first word on.
DISTINCT_CAPTIONS = [TINY_CORPUS[i] for i in (2, 6, 0, 1, 3, 4, 5, 7)]


def captions_differ(model, inputs, num_beams: int, max_new_tokens: int = 4) -> bool:
    """Whether ``generate`` (greedy or beam search) writes a different caption for each image of ``inputs``."""
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, pad_token_id=0
    )
    return len({tuple(row.tolist()) for row in out}) == out.shape[0]


def teach_distinct_captions(
    model, tokenizer, *batches: dict[str, torch.Tensor], beams=(1, 2), max_new_tokens: int = 4, max_steps=150
):
    """Train ``model`` until the images of each of ``batches`` get different captions (greedy and with each beam
    width of ``beams``), teaching each image of a batch another caption of :data:`DISTINCT_CAPTIONS` (at most 8).

    A random tiny model writes the same tokens for every image (its mapper's constant and small weights drown
    the image), so comparing a batch with one image at a time could not see rows that were swapped or mixed. The
    mapper starts from torch's default Linear init (weights about 5x transformers' 0.02), which lets the image
    through, so a few steps suffice; the tower is frozen: its embeddings are computed once.
    """
    for module in model.model.mapping_network.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    targets = []
    for inputs in batches:
        with torch.no_grad():
            _, embeds = model.get_prefix(**inputs)
        ids = [tokenizer(c)["input_ids"] for c in DISTINCT_CAPTIONS[: embeds.shape[0]]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [tokenizer.eos_token_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        targets.append((embeds, input_ids, mask))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(max_steps + 1):
        if step % 5 == 0:
            model.eval()
            if all(
                captions_differ(model, {"image_embeds": embeds}, b, max_new_tokens)
                for embeds, _, _ in targets
                for b in beams
            ):
                return model
            model.train()
        optimizer.zero_grad()
        for embeds, input_ids, mask in targets:
            labels = input_ids.masked_fill(mask == 0, -100)
            model(
                image_embeds=embeds, input_ids=input_ids, attention_mask=mask, labels=labels
            ).loss.backward()
        optimizer.step()
    raise AssertionError(f"{max_steps} steps did not give the images different captions")


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    return tok


def processor_images():
    """Two images of different aspect ratios (SigLIP2's processor gives them different patch counts)."""
    from PIL import Image

    return [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (20, 60), (20, 20, 200))]


def siglip2_processor(tokenizer):
    from transformers import Siglip2ImageProcessorPil

    from modeling_clipcap import ClipCapProcessor

    return ClipCapProcessor(Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16), tokenizer)


@pytest.fixture(scope="module")
def vision_models(tokenizer):
    """Each vision family with a tiny GPT-2 (MLP mapper, pooled input), taught distinct captions for the images
    the tests compare (SigLIP2 also for the processor's two images)."""
    models = {}
    for family in VISION:
        batches = [image_inputs(family, 2)]
        if family == "siglip2_vision_model":
            batches.append(dict(siglip2_processor(tokenizer)(images=processor_images(), return_tensors="pt")))
        models[family] = teach_distinct_captions(build(family, "gpt2", len(tokenizer)), tokenizer, *batches)
    return models


@pytest.fixture(scope="module")
def language_models(tokenizer):
    """Each LM family with a tiny CLIP tower (transformer mapper), taught distinct captions for the images the
    tests compare."""
    return {
        family: teach_distinct_captions(
            build("clip_vision_model", family, len(tokenizer), mapping_type="transformer"),
            tokenizer,
            image_inputs("clip_vision_model", 2, seed=2),
            beams=(1, 3),
        )
        for family in LANGUAGE
    }


def test_every_supported_family_is_tested():
    assert set(VISION) == set(VISION_FAMILIES)
    assert set(LANGUAGE) == set(FAST_PATH_LANGUAGE_FAMILIES)


def training_step(model, tokenizer, inputs):
    """One AdamW step on a caption batch; returns the names of the parameters it changed."""
    model.train()
    enc = tokenizer(["a red circle.", "a cat on a table.", "two dogs."], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    try:
        loss = model(**inputs, input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    finally:
        with torch.no_grad():  # the module-scoped model goes back to what the other tests expect
            for n, p in model.named_parameters():
                p.copy_(before[n])
                p.grad = None
        model.eval()
    return changed


def assert_batched_equals_single(model, inputs, batch, **kwargs):
    """Each row of a batched ``generate`` equals that image's own ``generate`` (up to the batch's padding); the
    images' captions differ, so a batch that mixed up its rows would fail."""
    kwargs = dict(max_new_tokens=4, do_sample=False, **kwargs)
    batched = model.generate(**inputs, **kwargs)
    assert batched.shape[0] == batch
    assert len({tuple(row.tolist()) for row in batched}) == batch, f"captions coincide: {batched.tolist()}"
    eos = model.generation_config.eos_token_id
    for i in range(batch):
        single = model.generate(**rows(inputs, i), **kwargs)[0]
        assert torch.equal(batched[i, : single.shape[0]], single), (i, batched[i], single)
        if single.shape[0] < batched.shape[1]:
            assert single[-1].item() == eos
    return batched


# ----------------------------------------------------------------------------- vision families


@pytest.mark.parametrize("family", list(VISION))
def test_vision_family_trains_the_mapper_and_generates_batched_as_single(family, vision_models, tokenizer):
    model = vision_models[family]
    inputs = image_inputs(family, 3)
    changed = training_step(model, tokenizer, inputs)
    assert any(n.startswith("model.mapping_network.") for n in changed)
    assert not any(n.startswith("model.vision_model.") for n in changed)  # frozen tower
    assert any(n.startswith("language_model.") for n in changed)
    inputs = {k: v[:2] for k, v in inputs.items()}
    # the prefix is the mapper of the family's pooled embedding (which embedding: the test below)
    prefix, embeds = model.get_prefix(**inputs)
    assert embeds.shape == (2, model.config.image_embed_dim)
    torch.testing.assert_close(prefix, model.mapping_network(embeds))
    for num_beams in (1, 2):
        assert_batched_equals_single(model, inputs, 2, num_beams=num_beams)


def test_pooled_embedding_is_the_documented_output_of_each_family(vision_models):
    """Which output each family's image embedding is (towers.VISION_FAMILIES), checked on the towers themselves;
    SigLIP2 with its patch mask and shapes (the test below shows the mask matters)."""
    x = image_inputs("vit", 2)["pixel_values"]
    naflex = image_inputs("siglip2_vision_model", 2)
    expected = {
        "clip_vision_model": lambda t: t(pixel_values=x).image_embeds,
        "siglip_vision_model": lambda t: t(pixel_values=x).pooler_output,
        "siglip2_vision_model": lambda t: t(**naflex).pooler_output,
        "dinov2": lambda t: t(pixel_values=x).pooler_output,
        "vit": lambda t: t.layernorm(t(pixel_values=x, output_hidden_states=True).hidden_states[-1])[:, 0],
        "convnext": lambda t: t(pixel_values=x).pooler_output,
        "convnextv2": lambda t: t(pixel_values=x).pooler_output,
        "resnet": lambda t: t(pixel_values=x).pooler_output.flatten(1),
    }
    assert set(expected) == set(VISION)
    for family, reference in expected.items():
        model = vision_models[family]
        inputs = naflex if family == "siglip2_vision_model" else {"pixel_values": x}
        with torch.no_grad():
            _, got = model.get_prefix(**inputs)  # the image embedding the mapper reads
            torch.testing.assert_close(got, reference(model.vision_model), msg=family)
    assert vision_models["vit"].vision_model.pooler is None  # no untrained tanh pooler in the model


def test_siglip2_pooled_embedding_reads_only_the_unmasked_patches(vision_models):
    """SigLIP2's pooled embedding depends on pixel_attention_mask: whatever fills the padding patch slots leaves
    each image's embedding unchanged, an image alone equals it in a batch with an image of another patch count,
    and dropping the mask changes it (so a model that lost the mask on the way would fail here)."""
    model = vision_models["siglip2_vision_model"]
    inputs = image_inputs("siglip2_vision_model", 2)
    mask = inputs["pixel_attention_mask"]
    assert mask.sum(1).tolist() == [16, 12]  # the second image pads 4 of its 16 slots
    noisy = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    noisy["pixel_values"][mask == 0] = 50.0  # padding that would dominate the pooling if it were attended to
    unmasked = dict(noisy, pixel_attention_mask=torch.ones_like(mask))
    with torch.no_grad():
        _, pooled = model.get_prefix(**inputs)
        _, padded_noise = model.get_prefix(**noisy)
        _, alone = model.get_prefix(**rows(inputs, 1))
        _, without_mask = model.get_prefix(**unmasked)
    torch.testing.assert_close(padded_noise, pooled)
    torch.testing.assert_close(alone[0], pooled[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(without_mask[1], pooled[1], atol=1e-3)
    torch.testing.assert_close(without_mask[0], pooled[0])  # the unpadded image never had a mask to lose


# ----------------------------------------------------------------------------- language-model families


def greedy_without_cache(model, inputs, steps):
    """Reference greedy decoding: the full forward over [prefix ; tokens so far] at every step, no cache."""
    tokens = torch.zeros(inputs["pixel_values"].shape[0], 0, dtype=torch.long)
    for _ in range(steps):
        logits = model(**inputs, input_ids=tokens if tokens.shape[1] else None).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("family", list(LANGUAGE))
def test_language_family_generate_contract(family, language_models, tokenizer):
    model = language_models[family]
    inputs = image_inputs("clip_vision_model", 3, seed=2)
    changed = training_step(model, tokenizer, inputs)
    assert any(n.startswith("model.mapping_network.") for n in changed)
    assert any(n.startswith("language_model.") for n in changed)
    inputs = {k: v[:2] for k, v in inputs.items()}
    for num_beams in (1, 3):
        assert_batched_equals_single(model, inputs, 2, num_beams=num_beams)
    # KV-cached greedy == the uncached reference
    no_stop = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = model.generate(**inputs, **no_stop)
    with torch.no_grad():
        assert torch.equal(greedy, greedy_without_cache(model, inputs, 5))
    # sampling: seeded runs repeat; top_k=1 sampling is greedy
    sample = dict(do_sample=True, top_k=20, temperature=1.5, max_new_tokens=5, num_return_sequences=2)
    torch.manual_seed(0)
    a = model.generate(**inputs, **sample)
    torch.manual_seed(0)
    assert a.shape[0] == 4 and torch.equal(a, model.generate(**inputs, **sample))
    assert torch.equal(model.generate(**inputs, **{**no_stop, "do_sample": True, "top_k": 1}), greedy)
    # a left-padded prompt batch == each prompt alone, returned before the new tokens
    texts = ["a red", "two dogs playing"]
    prompts = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(
        **inputs, input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, **no_stop
    )
    length = prompts.input_ids.shape[1]
    assert torch.equal(out[:, :length], prompts.input_ids)
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt").input_ids
        single = model.generate(**rows(inputs, i), input_ids=ids, **no_stop)
        assert torch.equal(single[0, ids.shape[1] :], out[i, length:]), (family, i)


def _count_calls(monkeypatch, module, name) -> list[int]:
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("family", list(LANGUAGE))
def test_speed_paths_give_the_stock_tokens_for_every_family(family, language_models, monkeypatch):
    import modeling_clipcap.modeling_clipcap as modeling  # the speed paths are called from there

    model = language_models[family]
    inputs = image_inputs("clip_vision_model", 2, seed=3)
    beam = dict(num_beams=3, num_return_sequences=2, max_new_tokens=5, min_new_tokens=3, pad_token_id=0)
    prefills = _count_calls(monkeypatch, modeling, "prefill_shared_prefix")
    blocks = _count_calls(monkeypatch, modeling, "blocked_output_layer")
    swaps = _count_calls(monkeypatch, modeling, "swap_min_length_processors")
    model.cpu_output_layer_block = 7  # several vocabulary blocks on the tiny vocabulary
    fast = model.generate(**inputs, **beam, return_dict_in_generate=True, output_scores=True)
    assert prefills and blocks and swaps, "the speed paths did not run"
    model.shared_prefill, model.fast_eos_suppression, model.cpu_output_layer_block = False, False, None
    try:
        stock = model.generate(**inputs, **beam, return_dict_in_generate=True, output_scores=True)
    finally:
        del model.shared_prefill, model.fast_eos_suppression, model.cpu_output_layer_block
    assert len(prefills) == 1
    assert torch.equal(fast.sequences, stock.sequences)
    torch.testing.assert_close(fast.sequences_scores, stock.sequences_scores)


def test_other_causal_lm_runs_its_own_forward(tokenizer, monkeypatch):
    """A decoder outside the fast-path families (Gemma 2: logit soft-capping) keeps its own head and cache."""
    torch.manual_seed(0)
    text = AutoConfig.for_model("gemma2", vocab_size=len(tokenizer), **ROPE, final_logit_softcapping=2.0,
                                bos_token_id=len(tokenizer) - 1, eos_token_id=len(tokenizer) - 1, pad_token_id=0)  # fmt: skip
    config = ClipCapConfig(vision_config=tiny_vision_config(), text_config=text, prefix_length=4)
    inputs = image_inputs("clip_vision_model", 2)
    model = teach_distinct_captions(ClipCapForConditionalGeneration(config), tokenizer, inputs)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        logits = model(**inputs, input_ids=ids).logits
        prefix, _ = model.get_prefix(**inputs)
        embeds = torch.cat([prefix, model.get_input_embeddings()(ids)], dim=1)
        torch.testing.assert_close(logits, model.language_model(inputs_embeds=embeds).logits)
    assert logits.abs().max() <= 2.0  # soft-capped
    import modeling_clipcap.modeling_clipcap as modeling  # the speed paths are called from there

    prefills = _count_calls(monkeypatch, modeling, "prefill_shared_prefix")
    assert_batched_equals_single(model, inputs, 2, num_beams=2)
    assert prefills == []  # its cache is its own: no shared prefill


# ----------------------------------------------------------------------------- save / load


#: Save / load pairs: every vision family and every LM family once (diagonal pairing keeps the suite fast).
SAVED_PAIRS = [(v, list(LANGUAGE)[i % len(LANGUAGE)]) for i, v in enumerate(VISION)]


@pytest.fixture(scope="module")
def saved_models(tokenizer, tmp_path_factory):
    """A model of each pair of ``SAVED_PAIRS`` saved with save_pretrained, and its tokens for fixed inputs."""
    root = tmp_path_factory.mktemp("families")
    saved = {}
    kwargs = dict(max_new_tokens=4, num_beams=2)
    for i, (vision, language) in enumerate(SAVED_PAIRS):
        name = f"{vision}+{language}"
        mapper = ("mlp", "transformer")[i % 2]
        model = build(vision, language, len(tokenizer), seed=i, mapping_type=mapper)
        model.save_pretrained(root / name)
        inputs = image_inputs(vision, 2, seed=4)
        torch.save(inputs, root / name / "inputs.pt")
        saved[name] = (root / name, model.generate(**inputs, **kwargs))
    return saved


def test_saved_pairs_cover_every_family():
    assert {v for v, _ in SAVED_PAIRS} == set(VISION) and {t for _, t in SAVED_PAIRS} == set(LANGUAGE)


def test_save_pretrained_then_auto_model_gives_the_same_tokens(saved_models):
    for name, (path, expected) in saved_models.items():
        loaded = AutoModel.from_pretrained(path).eval()
        assert isinstance(loaded, ClipCapForConditionalGeneration), name
        inputs = torch.load(path / "inputs.pt", weights_only=True)
        assert torch.equal(loaded.generate(**inputs, max_new_tokens=4, num_beams=2), expected), name


@pytest.mark.slow  # a fresh interpreter imports transformers and loads 8 models: about 20 s on 2 busy cores
def test_trust_remote_code_without_the_package_gives_the_same_tokens(saved_models, tmp_path):
    for path, _ in saved_models.values():
        assert {"towers.py", "mapping_networks.py", "compat.py"} <= {p.name for p in path.iterdir()}
    proc = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModel
        result = {{}}
        for name, path in {json.dumps({n: str(p) for n, (p, _) in saved_models.items()})}.items():
            model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            inputs = torch.load(path + "/inputs.pt", weights_only=True)
            result[name] = model.generate(**inputs, max_new_tokens=4, num_beams=2).tolist()
        print(json.dumps(result))
        """,
        cwd=tmp_path,
        env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {name: expected.tolist() for name, (_, expected) in saved_models.items()}


# ----------------------------------------------------------------------------- mapping_input="tokens"


@pytest.mark.parametrize("family, tokens, width", [("dinov2", 17, 32), ("convnext", 16, 16)])
def test_token_features_into_the_transformer_mapper(family, tokens, width, tokenizer):
    """ViT-like towers give (B, 1 + patches, D); CNNs their (B, C, h, w) map flattened to (B, h*w, C)."""
    model = build(family, "gpt2", len(tokenizer), mapping_type="transformer", mapping_input="tokens")
    assert model.config.image_embed_dim == width
    inputs = image_inputs(family, 3)
    teach_distinct_captions(model, tokenizer, inputs)
    prefix, embeds = model.get_prefix(**inputs)
    assert embeds.shape == (3, tokens, width) and prefix.shape == (3, 4, 32)  # K prefix vectors all the same
    with torch.no_grad():
        raw = model.vision_model(**inputs).last_hidden_state
    raw = raw.flatten(2).transpose(1, 2) if raw.ndim == 4 else raw
    torch.testing.assert_close(embeds, raw)
    # every token reaches the prefix (it is not a pooled vector): changing one token changes it
    changed = embeds.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(model.get_prefix(image_embeds=changed)[0], prefix)
    # precomputed token features decode as the pixels do
    kwargs = dict(max_new_tokens=5, num_beams=2)
    assert torch.equal(model.generate(image_embeds=embeds, **kwargs), model.generate(**inputs, **kwargs))
    assert any(n.startswith("model.mapping_network.") for n in training_step(model, tokenizer, inputs))
    for num_beams in (1, 2):
        assert_batched_equals_single(model, inputs, 3, num_beams=num_beams)
    with pytest.raises(ValueError, match=r"\(batch, tokens, "):
        model.generate(image_embeds=embeds[:, 0], max_new_tokens=2)


def test_siglip_without_its_pooling_head_works_with_tokens_only(tokenizer):
    vision = AutoConfig.for_model(
        "siglip_vision_model", **VISION["siglip_vision_model"], vision_use_head=False
    )
    text = text_config("gpt2", len(tokenizer))
    with pytest.raises(ValueError, match=r"vision_use_head=False.*mapping_input='tokens'.*Supported"):
        ClipCapConfig(vision_config=vision, text_config=text)
    config = ClipCapConfig(vision_config=vision, text_config=text, mapping_type="transformer",
                           mapping_input="tokens", mapping_num_heads=4, prefix_length=3)  # fmt: skip
    model = ClipCapForConditionalGeneration(config).eval()
    assert model.generate(**image_inputs("siglip_vision_model", 2), max_new_tokens=3).shape[0] == 2


# ----------------------------------------------------------------------------- bad combinations


@pytest.mark.parametrize(
    "vision, text, overrides, message",
    [
        (
            "gpt2",
            "gpt2",
            {},
            r"'gpt2', which is not a supported image tower\. Supported: CLIP .*SigLIP.*DINOv2.*ResNet",
        ),
        ("clip_vision_model", "t5", {}, r"'t5', an encoder-decoder model.*decoder-only causal.*llama"),
        ("clip_vision_model", "bart", {}, r"'bart', an encoder-decoder model"),
        ("clip_vision_model", "clip_vision_model", {}, r"not a causal language model.*gpt2, llama"),
        ("dinov2", "gpt2", {"mapping_input": "tokens"}, r"needs mapping_type='transformer'"),
        ("dinov2", "gpt2", {"image_embed_dim": 7}, r"image_embed_dim=7 does not match .* hidden_size=32"),
    ],
)
def test_bad_combinations_name_the_supported_families(vision, text, overrides, message):
    configs = {"gpt2": tiny_text_config(300), "clip_vision_model": tiny_vision_config()}
    make = lambda t: configs.get(t) or AutoConfig.for_model(t, **VISION.get(t, {}) or {})  # noqa: E731
    with pytest.raises(ValueError, match=message):
        ClipCapConfig(vision_config=make(vision), text_config=make(text), **overrides)


def test_a_full_dual_encoder_config_gives_its_vision_tower():
    from transformers import CLIPConfig, SiglipConfig

    clip = CLIPConfig(vision_config=tiny_vision_config().to_dict(), projection_dim=20)
    config = ClipCapConfig(vision_config=clip, text_config=tiny_text_config(300))
    assert config.vision_config.model_type == "clip_vision_model" and config.image_embed_dim == 20
    siglip = SiglipConfig(vision_config=VISION["siglip_vision_model"])
    config = ClipCapConfig(vision_config=siglip, text_config=tiny_text_config(300))
    assert config.vision_config.model_type == "siglip_vision_model" and config.image_embed_dim == 32
    again = ClipCapConfig.from_dict(config.to_dict())  # saved as the tower alone
    assert again.vision_config.model_type == "siglip_vision_model"


# ----------------------------------------------------------------------------- from_vision_text_pretrained


def _save_pair(tmp_path, tokenizer, vision_model, image_processor, language: str):
    vision_model.save_pretrained(tmp_path / "vision")
    image_processor.save_pretrained(tmp_path / "vision")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(text_config(language, len(tokenizer))).eval()
    lm.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    return lm


def test_from_vision_text_pretrained_full_siglip_and_llama(tmp_path, tokenizer):
    from transformers import AutoProcessor, SiglipConfig, SiglipImageProcessor, SiglipModel

    from modeling_clipcap import ClipCapProcessor

    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(vision_config=VISION["siglip_vision_model"],
                                      text_config=dict(VIT, vocab_size=99))).eval()  # fmt: skip
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    lm = _save_pair(tmp_path, tokenizer, siglip, image_processor, "llama")
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        str(tmp_path / "vision"), str(tmp_path / "text"), prefix_length=3
    ).eval()
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_prefix(pixel_values=pixel_values)[1],  # the image embedding the mapper reads
            siglip.get_image_features(pixel_values=pixel_values).pooler_output,
        )
        ids = torch.tensor([[5, 6, 7]])
        torch.testing.assert_close(model.language_model(input_ids=ids).logits, lm(input_ids=ids).logits)
    processor = ClipCapProcessor.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"))
    assert isinstance(processor.image_processor, SiglipImageProcessor)
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    processor.save_pretrained(tmp_path / "clipcap")
    model.save_pretrained(tmp_path / "clipcap")
    again = AutoProcessor.from_pretrained(tmp_path / "clipcap")
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    inputs = again(images=[image, image], return_tensors="pt")
    expected = image_processor(images=[image, image], return_tensors="pt").pixel_values
    torch.testing.assert_close(inputs["pixel_values"], expected)
    loaded = AutoModel.from_pretrained(tmp_path / "clipcap").eval()
    kwargs = dict(max_new_tokens=4, num_beams=2)
    assert torch.equal(loaded.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs))


@pytest.mark.parametrize(
    "vision, language, overrides",
    [("dinov2", "qwen2", dict(mapping_type="transformer", mapping_input="tokens", mapping_num_heads=4)),
     ("convnext", "gpt_neox", {})],
)  # fmt: skip
def test_from_vision_text_pretrained_other_towers(vision, language, overrides, tmp_path, tokenizer):
    """A DINOv2 base checkpoint and a ConvNeXt image-classification checkpoint give their towers' weights."""
    from transformers import AutoModelForImageClassification, BitImageProcessor, ConvNextImageProcessor

    torch.manual_seed(0)
    config = vision_config(vision)
    source = (
        AutoModel.from_config(config)
        if vision == "dinov2"
        else AutoModelForImageClassification.from_config(config)
    )
    processor = BitImageProcessor() if vision == "dinov2" else ConvNextImageProcessor()
    _save_pair(tmp_path, tokenizer, source, processor, language)
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        str(tmp_path / "vision"), str(tmp_path / "text"), prefix_length=3, **overrides
    )
    tower = source if vision == "dinov2" else source.convnext
    for name, tensor in tower.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=3).shape[0] == 2


def test_from_vision_text_pretrained_refuses_bad_checkpoints(tmp_path, tokenizer):
    from transformers import GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_text_config(len(tokenizer))).save_pretrained(tmp_path / "gpt2")
    T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
                               ).save_pretrained(tmp_path / "t5")  # fmt: skip
    AutoModel.from_config(vision_config("dinov2")).save_pretrained(tmp_path / "dinov2")
    with pytest.raises(ValueError, match="not a supported image tower"):
        ClipCapForConditionalGeneration.from_vision_text_pretrained(
            str(tmp_path / "gpt2"), str(tmp_path / "gpt2")
        )
    with pytest.raises(ValueError, match="encoder-decoder"):
        ClipCapForConditionalGeneration.from_vision_text_pretrained(
            str(tmp_path / "dinov2"), str(tmp_path / "t5")
        )


@pytest.mark.parametrize(
    "preset, vision, text",
    [
        ("clipcap-siglip-smollm2", dict(model_type="siglip_vision_model", hidden_size=768, image_size=224,
         patch_size=16), dict(model_type="llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
         max_position_embeddings=8192, vocab_size=49152)),
        ("clipcap-dinov2-qwen2.5", dict(model_type="dinov2", hidden_size=384, num_attention_heads=6,
         patch_size=14), dict(model_type="qwen2", hidden_size=896, num_attention_heads=14,
         num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936)),
    ],
)  # fmt: skip
def test_modern_pair_presets_are_valid_configs(preset, vision, text):
    """The presets' fields build a config with the published widths of their parts (weights are not reachable)."""
    from conftest import REPO_ROOT

    fields = json.loads((REPO_ROOT / "hub_configs" / preset / "config.json").read_text())
    fields.pop("model_type")
    config = ClipCapConfig(vision_config=vision, text_config=text, **fields)
    assert config.image_embed_dim == vision["hidden_size"] and config.hidden_size == text["hidden_size"]
    args = json.loads((REPO_ROOT / "hub_configs" / preset / "training_args.json").read_text())
    assert (
        "UNTESTED" in args["_comment"]
        and args["vision_model_name_or_path"]
        and args["text_model_name_or_path"]
    )


def test_processor_with_the_towers_own_image_processor_feeds_generate(vision_models, tokenizer, tmp_path):
    """SigLIP2's NaFlex processor gives patches, their mask and shapes: the processor passes all three, and the
    model decodes them batched as one at a time; AutoProcessor reloads the same image processor."""
    from transformers import AutoProcessor, Siglip2ImageProcessorPil

    processor = siglip2_processor(tokenizer)
    images = processor_images()
    inputs = processor(images=images, return_tensors="pt")
    assert set(processor.model_input_names) >= {"pixel_attention_mask", "spatial_shapes", "input_ids"}
    assert inputs["spatial_shapes"].tolist() == [[3, 4], [6, 2]]  # two aspect ratios, different patch counts
    model = vision_models["siglip2_vision_model"]
    assert_batched_equals_single(model, dict(inputs), 2, num_beams=2)
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(again.image_processor, Siglip2ImageProcessorPil)
    torch.testing.assert_close(again(images=images)["pixel_values"], inputs["pixel_values"])
