"""Conversion of original ClipCap checkpoints (modeling_clipcap.convert_original).

No real checkpoint exists offline, so the tests build state dicts in the ORIGINAL layout (key names and
shapes of rmokady/CLIP_prefix_caption, see REFERENCE.md) with random values around a tiny GPT-2, save them
with ``torch.save``, convert them, and compare the converted model against an independent re-implementation
of the original mapping maths written below (einsum attention with the original (b, m, 2, heads, hd)
keys/values reshape, concatenation [clip tokens ; constant] and output = last K positions), run through a
plain ``GPT2LMHeadModel`` as the original code does, with greedy decoding re-running the whole sequence at
each step (no cache) and stopping at ".".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_text_config, tiny_vision_config
from transformers import AutoModel, GPT2LMHeadModel

import modeling_clipcap
from modeling_clipcap.convert_original import (
    ConversionError,
    convert_original_checkpoint,
    describe_checkpoint,
    load_original_state_dict,
)

STOP = 13  # "." in GPT-2 and in the tiny tokenizer
HEADS = 8  # the original mapper's head count (E=32 -> head_dim 4)

# ---------------------------------------------------------------------------------------------------------
# Original-layout checkpoints
# ---------------------------------------------------------------------------------------------------------


def original_gpt_state_dict(text_config, seed: int) -> dict[str, torch.Tensor]:
    """``gpt.*`` keys as the original saved them, including the obsolete attention-mask buffers.

    The final layer norm's bias and the "." / <|endoftext|> embeddings are shifted so that greedy decoding
    ends at "." after a few tokens for some inputs and runs to the limit for others.
    """
    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(text_config)
    sd = {}
    for key, value in gpt.state_dict().items():
        value = value.clone()
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = 1 + 0.2 * torch.randn_like(value)
        elif key.endswith("bias"):
            value = 0.05 * torch.randn_like(value)
        elif key != "lm_head.weight":
            value = 0.3 * torch.randn_like(value)
        sd["gpt." + key] = value
    width = text_config.n_embd
    direction = F.normalize(torch.randn(width), dim=0)
    sd["gpt.transformer.ln_f.bias"] = sd["gpt.transformer.ln_f.bias"] + 0.6 * direction
    sd["gpt.transformer.wte.weight"][STOP] = 2.2 * direction + 0.3 * torch.randn(width)
    eos = text_config.eos_token_id
    sd["gpt.transformer.wte.weight"][eos] = 2.0 * direction + 0.3 * torch.randn(width)
    sd["gpt.lm_head.weight"] = sd["gpt.transformer.wte.weight"]  # tied, as in GPT2LMHeadModel
    p = text_config.n_positions
    for i in range(text_config.n_layer):
        sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(p, p, dtype=torch.uint8)).view(
            1, 1, p, p
        )
        sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def original_mlp_state_dict(
    text_config, image_dim: int, prefix_length: int, seed: int
) -> dict[str, torch.Tensor]:
    sd = original_gpt_state_dict(text_config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    e = text_config.n_embd
    hidden = e * prefix_length // 2
    sd["clip_project.model.0.weight"] = torch.randn(hidden, image_dim, generator=g) / image_dim**0.5
    sd["clip_project.model.0.bias"] = 0.1 * torch.randn(hidden, generator=g)
    sd["clip_project.model.2.weight"] = torch.randn(e * prefix_length, hidden, generator=g) / hidden**0.5
    sd["clip_project.model.2.bias"] = 0.1 * torch.randn(e * prefix_length, generator=g)
    return sd


def original_transformer_state_dict(
    text_config, image_dim: int, prefix_length: int, clip_length: int, num_layers: int, seed: int
) -> dict[str, torch.Tensor]:
    sd = original_gpt_state_dict(text_config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    e = text_config.n_embd

    def w(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    def b(n, scale=0.1):
        return scale * torch.randn(n, generator=g)

    sd["clip_project.linear.weight"] = w(clip_length * e, image_dim)
    sd["clip_project.linear.bias"] = b(clip_length * e)
    sd["clip_project.prefix_const"] = torch.randn(prefix_length, e, generator=g)
    for i in range(num_layers):
        p = f"clip_project.transformer.layers.{i}."
        sd[p + "norm1.weight"] = 1 + b(e, 0.2)
        sd[p + "norm1.bias"] = b(e)
        sd[p + "attn.to_queries.weight"] = w(e, e)
        sd[p + "attn.to_keys_values.weight"] = w(2 * e, e)
        sd[p + "attn.project.weight"] = w(e, e)
        sd[p + "attn.project.bias"] = b(e)
        sd[p + "norm2.weight"] = 1 + b(e, 0.2)
        sd[p + "norm2.bias"] = b(e)
        sd[p + "mlp.fc1.weight"] = w(2 * e, e)
        sd[p + "mlp.fc1.bias"] = b(2 * e)
        sd[p + "mlp.fc2.weight"] = w(e, 2 * e)
        sd[p + "mlp.fc2.bias"] = b(e)
    return sd


# ---------------------------------------------------------------------------------------------------------
# Independent reference: the original formulation
# ---------------------------------------------------------------------------------------------------------


def ref_mlp_prefix(sd, x, prefix_length, width):
    h = torch.tanh(x @ sd["clip_project.model.0.weight"].T + sd["clip_project.model.0.bias"])
    out = h @ sd["clip_project.model.2.weight"].T + sd["clip_project.model.2.bias"]
    return out.view(-1, prefix_length, width)


def ref_attention(sd, p, x, heads, swap_kv=False):
    b, n, c = x.shape
    queries = (x @ sd[p + "attn.to_queries.weight"].T).reshape(b, n, heads, c // heads)
    keys_values = (x @ sd[p + "attn.to_keys_values.weight"].T).reshape(b, n, 2, heads, c // heads)
    keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
    if swap_kv:
        keys, values = values, keys
    attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * (c // heads) ** -0.5
    attention = attention.softmax(dim=2)
    out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
    return out @ sd[p + "attn.project.weight"].T + sd[p + "attn.project.bias"]


def ref_transformer_prefix(
    sd, x, clip_length, num_layers, heads=HEADS, const_first=False, swap_kv=False, output_clip_positions=False
):
    const = sd["clip_project.prefix_const"]
    k, e = const.shape
    tokens = (x @ sd["clip_project.linear.weight"].T + sd["clip_project.linear.bias"]).view(
        x.shape[0], clip_length, -1
    )
    const = const.unsqueeze(0).expand(x.shape[0], k, e)
    h = torch.cat((const, tokens) if const_first else (tokens, const), dim=1)
    for i in range(num_layers):
        p = f"clip_project.transformer.layers.{i}."
        n1 = F.layer_norm(h, (e,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        h = h + ref_attention(sd, p, n1, heads, swap_kv=swap_kv)
        n2 = F.layer_norm(h, (e,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        mlp = F.relu(n2 @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        h = h + mlp @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    if output_clip_positions:  # a wrong variant: the outputs at the CLIP tokens' positions
        return h[:, k : k + clip_length] if const_first else h[:, :clip_length]
    return h[:, :k] if const_first else h[:, clip_length:]


def ref_gpt(sd, text_config) -> GPT2LMHeadModel:
    """The original's GPT2LMHeadModel with the checkpoint's ``gpt.*`` weights (mask buffers dropped)."""
    gpt = GPT2LMHeadModel(text_config).eval()
    weights = {
        k[len("gpt.") :]: v
        for k, v in sd.items()
        if k.startswith("gpt.") and not re.match(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$", k)
    }
    gpt.load_state_dict(weights, strict=True)
    return gpt


@torch.no_grad()
def ref_greedy(gpt, prefix, max_new_tokens, stops):
    """Original-style greedy decoding of ONE image: full forward each step, no cache, stop after a stop token."""
    embeds = prefix.unsqueeze(0)
    tokens = []
    for _ in range(max_new_tokens):
        token = int(gpt(inputs_embeds=embeds).logits[0, -1].argmax())
        tokens.append(token)
        if token in stops:
            break
        embeds = torch.cat([embeds, gpt.transformer.wte.weight[token].view(1, 1, -1)], dim=1)
    return tokens


def assert_generated_equal(generated, references, pad_id, max_new_tokens):
    """Each row equals its reference, followed only by padding once the reference stopped early."""
    for row, ref in zip(generated.tolist(), references):
        assert row[: len(ref)] == ref, (row, ref)
        assert all(t == pad_id for t in row[len(ref) :]), (row, ref)
        assert len(ref) == max_new_tokens or ref[-1] in (STOP, pad_id)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: tiny GPT-2 and CLIP folders as a user would download them
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_config(tiny_tokenizer):
    return tiny_text_config(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, text_config, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gpt2")
    text_config.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A full (tiny) CLIP checkpoint folder with its image processor: what openai/clip-vit-base-patch32 holds."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    vision = tiny_vision_config(projection_dim=24).to_dict()
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100
    )
    torch.manual_seed(3)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def save(sd, path: Path) -> Path:
    torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Equivalence with the original formulation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_mlp_matches_original(tmp_path, text_config, text_dir, normalize):
    k, d = 10, 24
    sd = original_mlp_state_dict(text_config, d, k, seed=1)
    model = convert_original_checkpoint(
        save(sd, tmp_path / "coco_weights.pt"),
        preset="coco-mlp",
        image_embed_dim=d,
        normalize_prefix=normalize,
        text_model=text_dir,
    )
    assert model.vision_model is None and model.config.image_embed_dim == d
    torch.manual_seed(0)
    x = 3 * torch.randn(6, d)
    x_in = x / x.norm(2, -1, keepdim=True) if normalize else x
    expected_prefix = ref_mlp_prefix(sd, x_in, k, text_config.n_embd)
    prefix, _ = model.get_prefix(image_embeds=x)
    assert (prefix - expected_prefix).abs().max() <= 1e-5
    # the switch matters: the other setting gives another prefix
    other = ref_mlp_prefix(sd, x if normalize else x / x.norm(2, -1, keepdim=True), k, text_config.n_embd)
    assert (prefix - other).abs().max() > 1e-2
    check_logits_and_greedy(model, sd, text_config, x, expected_prefix)


@pytest.mark.parametrize("normalize", [False, True])
def test_transformer_matches_original(tmp_path, text_config, text_dir, normalize):
    k, clip_length, layers, d = 5, 3, 2, 24
    sd = original_transformer_state_dict(text_config, d, k, clip_length, layers, seed=1)
    model = convert_original_checkpoint(
        save(sd, tmp_path / "transformer_weights.pt"),
        mapping_type="transformer",
        prefix_length=k,
        clip_length=clip_length,
        num_layers=layers,
        image_embed_dim=d,
        normalize_prefix=normalize,
        text_model=text_dir,
    )
    assert model.config.freeze_language_model  # the transformer recipe froze GPT-2
    torch.manual_seed(0)
    x = 3 * torch.randn(6, d)
    x_in = x / x.norm(2, -1, keepdim=True) if normalize else x
    expected_prefix = ref_transformer_prefix(sd, x_in, clip_length, layers)
    prefix, _ = model.get_prefix(image_embeds=x)
    assert prefix.shape == (6, k, text_config.n_embd)
    assert (prefix - expected_prefix).abs().max() <= 1e-5
    # The comparison is sharp enough to catch a swapped keys/values split, output taken at the CLIP tokens'
    # positions instead of the constant's, or the normalisation switch:
    assert (prefix - ref_transformer_prefix(sd, x_in, clip_length, layers, swap_kv=True)).abs().max() > 1e-3
    wrong = ref_transformer_prefix(sd, x_in, clip_length, layers, output_clip_positions=True)
    assert (prefix[:, :clip_length] - wrong).abs().max() > 1e-3
    # The mapper has no positional encoding, so only WHICH outputs are kept matters, not where the constant
    # sits in the concatenation: [constant ; clip tokens] gives the same constant outputs.
    assert (
        prefix - ref_transformer_prefix(sd, x_in, clip_length, layers, const_first=True)
    ).abs().max() <= 1e-5
    x_other = x if normalize else x / x.norm(2, -1, keepdim=True)
    assert (prefix - ref_transformer_prefix(sd, x_other, clip_length, layers)).abs().max() > 1e-3
    # keys are the first E rows of to_keys_values, values the last E
    e = text_config.n_embd
    kv = model.mapping_network.layers[1].attn.kv_proj.weight
    original = sd["clip_project.transformer.layers.1.attn.to_keys_values.weight"]
    assert torch.equal(kv[:e], original[:e]) and torch.equal(kv[e:], original[e:])
    check_logits_and_greedy(model, sd, text_config, x, expected_prefix)


def check_logits_and_greedy(model, sd, text_config, x, expected_prefix, max_new_tokens=12):
    gpt = ref_gpt(sd, text_config)
    torch.manual_seed(1)
    ids = torch.randint(0, text_config.vocab_size, (x.shape[0], 7))
    with torch.no_grad():
        ours = model(image_embeds=x, input_ids=ids).logits
        ref = gpt(inputs_embeds=torch.cat([expected_prefix, gpt.transformer.wte(ids)], dim=1)).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4

    eos = text_config.eos_token_id
    assert model.generation_config.eos_token_id == [STOP, eos]
    assert model.generation_config.num_beams == 5 and model.generation_config.max_new_tokens == 67
    generated = model.generate(image_embeds=x, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    refs = [ref_greedy(gpt, p, max_new_tokens, {STOP, eos}) for p in expected_prefix]
    assert_generated_equal(generated, refs, eos, max_new_tokens)
    lengths = {len(r) for r in refs}
    # the batch mixes captions that stop at "." and ones that run longer: stopping is really exercised
    assert any(r[-1] == STOP for r in refs) and len(lengths) > 1, refs

    # exactly the original rule: stop on "." only
    generated = model.generate(
        image_embeds=x, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=STOP
    )
    refs = [ref_greedy(gpt, p, max_new_tokens, {STOP}) for p in expected_prefix]
    for row, ref in zip(generated.tolist(), refs):
        assert row[: len(ref)] == ref


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------


def _mlp_kwargs(text_dir):
    return dict(preset="coco-mlp", image_embed_dim=24, text_model=text_dir, verify=False)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda sd: sd.pop("clip_project.model.2.bias"), ["missing", "clip_project.model.2.bias"]),
        (
            lambda sd: sd.pop("gpt.transformer.h.1.mlp.c_fc.weight"),
            ["missing", "gpt.transformer.h.1.mlp.c_fc.weight"],
        ),
        (
            lambda sd: sd.__setitem__("clip_project.extra.weight", torch.zeros(3)),
            ["unexpected", "clip_project.extra.weight"],
        ),
        (
            lambda sd: sd.__setitem__("gpt.transformer.h.2.ln_1.weight", torch.ones(32)),
            ["unexpected", "gpt.transformer.h.2.ln_1.weight"],
        ),
        (
            lambda sd: sd.__setitem__("clip_project.model.0.weight", torch.zeros(160, 25)),
            ["mis-shaped", "clip_project.model.0.weight", "(160, 25)", "(160, 24)"],
        ),
    ],
    ids=["missing-mapper", "missing-gpt", "extra-mapper", "extra-gpt-layer", "wrong-shape"],
)
def test_malformed_checkpoints_are_refused(tmp_path, text_config, text_dir, edit, named):
    sd = original_mlp_state_dict(text_config, 24, 10, seed=1)
    edit(sd)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert_original_checkpoint(save(sd, tmp_path / "bad.pt"), out, **_mlp_kwargs(text_dir))
    for word in named:
        assert word in str(err.value)
    assert not out.exists(), "nothing is written for a refused checkpoint"


def test_wrong_settings_are_refused_with_a_hint(tmp_path, text_config, text_dir):
    sd = original_transformer_state_dict(text_config, 24, 5, 3, 2, seed=1)
    path = save(sd, tmp_path / "transformer_weights.pt")
    with pytest.raises(ConversionError) as err:  # an MLP conversion of a transformer checkpoint
        convert_original_checkpoint(path, **_mlp_kwargs(text_dir))
    message = str(err.value)
    assert "clip_project.prefix_const" in message and "clip_project.model.0.weight" in message
    assert "'mapping_type': 'transformer'" in message  # what the checkpoint looks like
    with pytest.raises(ConversionError, match="clip_project.transformer.layers.1"):  # one layer too few
        convert_original_checkpoint(
            path,
            mapping_type="transformer",
            prefix_length=5,
            clip_length=3,
            num_layers=1,
            image_embed_dim=24,
            text_model=text_dir,
        )
    assert describe_checkpoint(sd) == {
        "vocab_size": text_config.vocab_size,
        "n_embd": 32,
        "n_positions": 128,
        "n_layer": 2,
        "mapping_type": "transformer",
        "image_embed_dim": 24,
        "clip_length": 3,
        "prefix_length": 5,
        "mapping_num_layers": 2,
    }


def test_untied_lm_head_is_refused(tmp_path, text_config, text_dir):
    sd = original_mlp_state_dict(text_config, 24, 10, seed=1)
    sd["gpt.lm_head.weight"] = sd["gpt.lm_head.weight"] + 1
    with pytest.raises(ConversionError, match="gpt.lm_head.weight differs"):
        convert_original_checkpoint(save(sd, tmp_path / "untied.pt"), **_mlp_kwargs(text_dir))


class _WritesMarker:
    """Unpickling this runs ``open(path, "w")``: the kind of payload a malicious .pt file carries."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused_not_run(tmp_path, text_config, text_dir):
    sd = original_mlp_state_dict(text_config, 24, 10, seed=1)
    marker = tmp_path / "pwned"
    torch.save({**sd, "payload": _WritesMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="never unpickles"):
        convert_original_checkpoint(tmp_path / "evil.pt", tmp_path / "out", **_mlp_kwargs(text_dir))
    with pytest.raises(ConversionError):
        load_original_state_dict(tmp_path / "evil.pt")
    assert not marker.exists(), "the converter executed code from the pickle"
    # the payload is real: a full unpickle (which the converter never does) would have run it
    control = tmp_path / "control"
    torch.save({"payload": _WritesMarker(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ConversionError, match="not a state dict"):
        load_original_state_dict(tmp_path / "list.pt")
    with pytest.raises(ConversionError, match="does not exist"):
        load_original_state_dict(tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="Refusing to load"):
        load_original_state_dict(tmp_path / "garbage.pt")


# ---------------------------------------------------------------------------------------------------------
# A complete model directory
# ---------------------------------------------------------------------------------------------------------


def random_images(n, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def converted_mlp(tmp_path_factory, text_config, text_dir, clip_dir):
    """coco-mlp preset conversion with a full CLIP folder and a GPT-2 folder: (out dir, state dict, ckpt path)."""
    tmp = tmp_path_factory.mktemp("converted")
    sd = original_mlp_state_dict(text_config, 24, 10, seed=1)
    checkpoint = save(sd, tmp / "coco_weights.pt")
    out = tmp / "clipcap-coco-mlp"
    convert_original_checkpoint(
        checkpoint, out, preset="coco-mlp", vision_model=clip_dir, text_model=text_dir
    )
    return out, sd, checkpoint


def test_output_directory_is_a_complete_model(converted_mlp, clip_dir, text_config):
    import hashlib

    from transformers import AutoProcessor, CLIPModel

    out, sd, checkpoint = converted_mlp
    files = {p.name for p in out.iterdir()}
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
        "modeling_clipcap.py",
        "configuration_clipcap.py",
        "README.md",
        "conversion_info.json",
    ):
        assert name in files, (name, files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "clipcap"
        and config["mapping_type"] == "mlp"
        and config["prefix_length"] == 10
    )
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(config["auto_map"])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [STOP, text_config.eos_token_id]
    assert generation["num_beams"] == 5 and generation["max_new_tokens"] == 67
    assert generation["pad_token_id"] == text_config.eos_token_id

    card = (out / "README.md").read_text()
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert sha in card and "coco_weights.pt" in card and "108.35" in card and "MLP" in card
    assert "${" not in card
    info = json.loads((out / "conversion_info.json").read_text())
    assert info["source_sha256"] == sha and info["preset"] == "coco-mlp"
    assert info["num_original_keys"] == len(sd)

    # Loaded through the Auto classes, with pixels in: the caption of the original formulation.
    model = AutoModel.from_pretrained(out).eval()
    assert isinstance(model, modeling_clipcap.ClipCapForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(out)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.vision_model.state_dict()[name], tensor), name
    assert torch.equal(model.vision_model.visual_projection.weight, clip.visual_projection.weight)

    inputs = processor(images=random_images(3), return_tensors="pt")
    with torch.no_grad():
        clip_embeds = clip.get_image_features(pixel_values=inputs["pixel_values"])
        clip_embeds = getattr(clip_embeds, "pooler_output", clip_embeds)
    prefix = ref_mlp_prefix(sd, clip_embeds, 10, text_config.n_embd)
    gpt = ref_gpt(sd, text_config)
    refs = [ref_greedy(gpt, p, 10, {STOP, text_config.eos_token_id}) for p in prefix]
    ids = model.generate(**inputs, num_beams=1, max_new_tokens=10)
    assert_generated_equal(ids, refs, text_config.eos_token_id, 10)
    captions = processor.batch_decode(model.generate(**inputs))  # the saved defaults: beam 5, stop at "."
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_clip_vision_only_folder(tmp_path, text_config, text_dir, clip_dir):
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(5)
    tower = CLIPVisionModelWithProjection(tiny_vision_config())
    vision_dir = tmp_path / "clip-vision"
    tower.save_pretrained(vision_dir)  # no preprocessor_config.json: CLIP's standard one is built
    sd = original_mlp_state_dict(text_config, 24, 10, seed=1)
    out = tmp_path / "out"
    model = convert_original_checkpoint(
        save(sd, tmp_path / "c.pt"), out, preset="coco-mlp", vision_model=vision_dir, text_model=text_dir
    )
    assert torch.equal(model.vision_model.visual_projection.weight, tower.visual_projection.weight)
    assert json.loads((out / "processor_config.json").read_text())["image_processor"]["crop_size"] == {
        "height": 32,
        "width": 32,
    }
    with pytest.raises(ConversionError, match="contradicts"):
        convert_original_checkpoint(
            tmp_path / "c.pt",
            preset="coco-mlp",
            vision_model=vision_dir,
            text_model=text_dir,
            image_embed_dim=512,
        )


def test_preset_gives_the_released_settings_and_card(tmp_path, text_config, text_dir):
    """A released checkpoint's preset (found by presets.find_preset, also under its earlier conversion name)
    gives the width of its image embeddings (preset.json), its mapper settings (config.json) and its
    conversion card (conversion_card.md, not the trained-model README.md); a user's preset folder without a
    conversion card has its README.md filled in instead."""
    import shutil

    from modeling_clipcap.presets import find_preset

    checkpoint = save(original_mlp_state_dict(text_config, 512, 10, seed=2), tmp_path / "coco_weights.pt")
    for name in ("clipcap-coco-mlp", "coco-mlp"):
        out = tmp_path / name
        model = convert_original_checkpoint(checkpoint, out, preset=name, text_model=text_dir, verify=False)
        assert model.config.image_embed_dim == 512 and model.vision_model is None
        card = (out / "README.md").read_text()
        assert "108.35" in card and "coco_weights.pt" in card and "$hyperparameters" not in card
        assert json.loads((out / "conversion_info.json").read_text())["preset"] == name

    mine = tmp_path / "my-preset"
    shutil.copytree(find_preset("clipcap-coco-mlp"), mine)
    (mine / "conversion_card.md").unlink()
    (mine / "README.md").write_text("---\nlicense: mit\n---\n\nMine: ${source_file}\n")
    convert_original_checkpoint(checkpoint, tmp_path / "mine", preset=mine, text_model=text_dir, verify=False)
    assert "Mine: coco_weights.pt" in (tmp_path / "mine" / "README.md").read_text()
    with pytest.raises(ConversionError, match="no such preset folder"):
        convert_original_checkpoint(checkpoint, preset="coco-nothing", text_model=text_dir)


BLOCKER = textwrap.dedent(
    """
    # This interpreter must not be able to import the package: the editable install's finder (a .pth in
    # site-packages) and the repository folder are hidden by a meta-path finder placed before every other.
    import importlib.abc, sys
    class _HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_clipcap" or name.startswith("modeling_clipcap."):
                raise ModuleNotFoundError("modeling_clipcap is hidden in this test", name=name)
            return None
    sys.meta_path.insert(0, _HidePackage())
    try:
        import modeling_clipcap  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("modeling_clipcap is importable: the remote-code test would prove nothing")
    """
)


def isolated_env(base=None) -> dict:
    env = dict(base if base is not None else os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
def test_trust_remote_code_without_the_package(converted_mlp, tmp_path):
    """A fresh interpreter that cannot import modeling_clipcap loads the folder with trust_remote_code."""
    out, _, _ = converted_mlp
    model = AutoModel.from_pretrained(out).eval()
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    expected = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=8).tolist()
    code = BLOCKER + textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        ids = model.generate(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True), num_beams=2, max_new_tokens=8)
        print(json.dumps(ids.tolist()))
        print(json.dumps(processor.batch_decode(ids)))
        """
    )
    env = isolated_env()
    env["HF_HOME"] = str(tmp_path / "hf_home")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == expected
    assert len(json.loads(lines[-1])) == 2


# ---------------------------------------------------------------------------------------------------------
# Command line and Hub
# ---------------------------------------------------------------------------------------------------------


def clipcap_script() -> str:
    script = Path(sys.executable).parent / "clipcap"
    assert script.exists(), f"console script {script} missing: pip install -e ."
    return str(script)


@pytest.mark.slow
def test_cli_convert_transformer_preset_end_to_end(tmp_path, text_config, text_dir):
    """`clipcap convert --preset coco-transformer` with the released shapes (D=640, K=40, clip 40, 8 layers)."""
    sd = original_transformer_state_dict(text_config, 640, 40, 40, 8, seed=4)
    checkpoint = save(sd, tmp_path / "transformer_weights.pt")
    out = tmp_path / "clipcap-coco-transformer"
    proc = subprocess.run(
        [
            clipcap_script(),
            "convert",
            "--preset",
            "coco-transformer",
            "--checkpoint",
            str(checkpoint),
            "--text_model",
            str(text_dir),
            "--output_dir",
            str(out),
            "--max_new_tokens",
            "20",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Converted" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"] is None and config["image_embed_dim"] == 640
    assert (
        config["mapping_type"] == "transformer"
        and config["prefix_length"] == 40
        and config["clip_length"] == 40
    )
    assert config["mapping_num_layers"] == 8 and config["normalize_prefix"] is True
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 20
    assert "113.08" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").exists() and not (out / "preprocessor_config.json").exists()

    model = AutoModel.from_pretrained(out).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 640)
    prefix, _ = model.get_prefix(image_embeds=x)
    expected = ref_transformer_prefix(sd, x / x.norm(2, -1, keepdim=True), 40, 8)
    assert (prefix - expected).abs().max() <= 1e-5
    assert model.generate(image_embeds=x, num_beams=2).shape[0] == 2

    # a refused checkpoint: exit status 2 and the offending key named
    del sd["clip_project.transformer.layers.7.mlp.fc2.bias"]
    save(sd, checkpoint)
    from modeling_clipcap.cli import main

    status = main(
        [
            "convert",
            "--preset",
            "coco-transformer",
            "--checkpoint",
            str(checkpoint),
            "--text_model",
            str(text_dir),
            "--output_dir",
            str(tmp_path / "refused"),
        ]
    )
    assert status == 2 and not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_push_to_hub_and_load_back_with_remote_code(hub_server, tmp_path, text_config, text_dir, clip_dir):
    sd = original_mlp_state_dict(text_config, 24, 10, seed=1)
    checkpoint = save(sd, tmp_path / "coco_weights.pt")
    repo_id = f"{hub_server.user}/clipcap-coco-mlp"
    out = tmp_path / "converted"
    hub_server.run_python(
        f"""
        from modeling_clipcap.cli import main
        status = main(["convert", "--preset", "coco-mlp", "--checkpoint", {str(checkpoint)!r},
                       "--vision_model", {str(clip_dir)!r}, "--text_model", {str(text_dir)!r},
                       "--output_dir", {str(out)!r}, "--push_to_hub", "--hub_model_id", {repo_id!r},
                       "--private"])
        assert status == 0, status
        """
    )
    hub_server.assert_all_handled()
    assert hub_server.repo(repo_id).private is True  # --private (read back below with the token)
    files = hub_server.files(repo_id)
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "modeling_clipcap.py",
        "configuration_clipcap.py",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
    ):
        assert name in files, (name, sorted(files))
    assert repo_id in files["README.md"].decode()  # the card's usage names the repository

    local = AutoModel.from_pretrained(out).eval()
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    expected = local.generate(pixel_values=pixel_values, max_new_tokens=8).tolist()  # saved defaults: beam 5
    proc = hub_server.run_python(
        BLOCKER
        + textwrap.dedent(
            f"""
            import json, torch
            from transformers import AutoModel
            model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
            ids = model.generate(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True), max_new_tokens=8)
            print(json.dumps(ids.tolist()))
            """
        ),
        extra_env={"PYTHONPATH": "", "PYTHONNOUSERSITE": "1"},
        cwd=tmp_path,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
