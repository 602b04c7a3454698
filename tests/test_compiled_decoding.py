"""Compiled decoding (static cache + ``torch.compile``, CPU weight freezing) gives the tokens eager decoding gives."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clipcap_config

from modeling_clipcap import ClipCapForConditionalGeneration, compat
from modeling_clipcap.compiled_decoding import compile_image_tower, compiled_decoding_kwargs


def test_compiled_decoding_kwargs_ask_for_a_static_cache_and_cpu_freezing(tiny_model):
    kwargs = compiled_decoding_kwargs(tiny_model)
    assert kwargs["cache_implementation"] == "static"
    config = kwargs["compile_config"]
    assert config.dynamic is False and config.options == {"freezing": True}
    assert config._compile_all_devices is True  # CPU: transformers would not compile without it
    assert compiled_decoding_kwargs(tiny_model, freezing=False)["compile_config"].options is None


def test_without_the_private_switch_compilation_is_reported_impossible():
    class OldCompileConfig:  # a release without the private attribute
        pass

    assert compat.allow_compile_on_all_devices(OldCompileConfig()) is False


@pytest.mark.slow
def test_compiled_decoding_and_tower_give_the_eager_tokens(tiny_tokenizer):
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(tiny_clipcap_config(len(tiny_tokenizer))).eval()
    eos = model.config.text_config.eos_token_id
    pixel_values = torch.randn(3, 3, 32, 32)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=eos)
    eager = model.generate(pixel_values=pixel_values, **options)
    torch._dynamo.reset()
    compiled = model.generate(pixel_values=pixel_values, **options, **compiled_decoding_kwargs(model))
    assert torch.equal(compiled, eager)
    assert hasattr(model, "_compiled_call")  # transformers did compile the decoding step
    with torch.no_grad():
        embeds = model.get_image_embeddings(pixel_values).pooler_output
        compile_image_tower(model)
        compiled_embeds = model.get_image_embeddings(pixel_values).pooler_output
    torch.testing.assert_close(compiled_embeds, embeds, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(pixel_values=pixel_values, **options), eager)
