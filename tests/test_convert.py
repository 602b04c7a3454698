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
from conftest import tiny_text_config
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
        sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(p, p, dtype=torch.uint8)).view(1, 1, p, p)
        sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def original_mlp_state_dict(text_config, image_dim: int, prefix_length: int, seed: int) -> dict[str, torch.Tensor]:
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
    tokens = (x @ sd["clip_project.linear.weight"].T + sd["clip_project.linear.bias"]).view(x.shape[0], clip_length, -1)
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
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("clip")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
    torch.manual_seed(3)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
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
    assert (prefix - ref_transformer_prefix(sd, x_in, clip_length, layers, const_first=True)).abs().max() <= 1e-5
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
