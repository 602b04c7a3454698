"""oneDNN linear layers (``modeling_clipcap.cpu_linear``): same tokens as the default path, fallbacks intact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clipcap_config

from modeling_clipcap import ClipCapForConditionalGeneration, compat
from modeling_clipcap.cpu_linear import restore_linear, use_onednn_linear

needs_onednn = pytest.mark.skipif(compat.onednn_linear_ops() is None, reason="this torch build has no oneDNN")


def make_model(tiny_tokenizer, mapping_type="mlp", dtype=torch.float32):
    torch.manual_seed(0)
    config = tiny_clipcap_config(len(tiny_tokenizer), mapping_type=mapping_type)
    return ClipCapForConditionalGeneration(config).eval().to(dtype)


@needs_onednn
@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_same_tokens_and_close_logits_as_the_default_path(tiny_tokenizer, mapping_type, num_beams):
    model = make_model(tiny_tokenizer, mapping_type)
    pixel_values = torch.randn(4, 3, 32, 32)
    ids = torch.randint(0, len(tiny_tokenizer), (4, 5))
    options = dict(num_beams=num_beams, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=ids).logits
    tokens = model.generate(pixel_values=pixel_values, **options)
    layers = use_onednn_linear(model)
    # tower (q, k, v, out, fc1, fc2 x 2 layers + projection), mapper, GPT-2 (4 x 2 layers), output layer
    assert layers >= 2 * 6 + 1 + 2 * 4 + 1
    assert model.cpu_output_layer_block is None  # the blocked path would bypass the output layer's forward
    with torch.no_grad():
        fast_logits = model(pixel_values=pixel_values, input_ids=ids).logits
    torch.testing.assert_close(fast_logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(pixel_values=pixel_values, **options), tokens)
    assert restore_linear(model) == layers
    assert model.cpu_output_layer_block == 1024


@needs_onednn
def test_bf16_layers_stay_close(tiny_tokenizer):
    model = make_model(tiny_tokenizer, dtype=torch.bfloat16)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        prefix = model.get_prefix(pixel_values=pixel_values)[0]
        use_onednn_linear(model)
        fast = model.get_prefix(pixel_values=pixel_values)[0]
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), prefix.float(), rtol=0.05, atol=0.05)


@needs_onednn
def test_training_uses_the_layers_own_forward_and_edited_weights_are_repacked(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    use_onednn_linear(model)
    embeds = torch.randn(2, 24)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 4))
    loss = model(image_embeds=embeds, input_ids=ids, labels=ids).loss
    loss.backward()  # gradients flow: the rerouted forward steps aside when gradients are on
    assert model.language_model.lm_head.weight.grad is not None
    layer = next(m for m in model.model.mapping_network.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # an in-place edit after packing
        after = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_without_onednn_nothing_changes(tiny_tokenizer, monkeypatch):
    import modeling_clipcap.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "onednn_linear_ops", lambda: None)
    model = make_model(tiny_tokenizer)
    assert use_onednn_linear(model) == 0
    assert model.cpu_output_layer_block == 1024
    assert not any("forward" in m.__dict__ for m in model.modules())
