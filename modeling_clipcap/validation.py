"""Checks of what a user hands the model, run before any model work, with errors that say what to do.

This file travels with saved models (``trust_remote_code``): it imports only torch, transformers and its
siblings.
"""

from __future__ import annotations

from typing import Any

import torch

from .towers import position_limit, vision_family

#: ``generate`` options that draft tokens with a second model (or a truncated copy of this one) that is given
#: ``input_ids`` alone, without the image prefix: its drafts would come from a model that never saw the image.
#: (``prompt_lookup_num_tokens`` drafts from the ids themselves and is verified by this model with its prefix:
#: allowed, same tokens as greedy decoding.)
ASSISTED_DECODING_OPTIONS = ("assistant_model", "assistant_early_exit")


def _check_pixel_values(config: Any, pixel_values: Any) -> None:
    """``pixel_values`` must be finite floats in the layout of the tower's family."""
    if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
        kind = type(pixel_values).__name__ if not torch.is_tensor(pixel_values) else pixel_values.dtype
        raise ValueError(
            f"`pixel_values` must be a floating-point tensor, got {kind}; use the model's processor to turn images "
            "into pixel values."
        )
    vc = config.vision_config
    layout = vision_family(vc).pixels
    if layout == "patches":
        if pixel_values.ndim != 3:
            raise ValueError(
                f"`pixel_values` of a {vc.model_type} tower must be patches (batch, patches, channels * patch_size**2),"
                f" got {tuple(pixel_values.shape)}; use the model's processor."
            )
    elif layout == "square":
        expected = (vc.num_channels, vc.image_size, vc.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{tuple(pixel_values.shape)}; use the model's processor to resize and normalise images."
            )
    elif pixel_values.ndim != 4 or pixel_values.shape[1] != vc.num_channels:
        raise ValueError(
            f"`pixel_values` must have shape (batch, {vc.num_channels}, height, width), got "
            f"{tuple(pixel_values.shape)}; use the model's processor to resize and normalise images."
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError(
            "`pixel_values` contains NaN or infinite values; use the model's processor on the images (it gives "
            "finite, normalised values)."
        )


def _check_image_embeds(config: Any, image_embeds: Any) -> None:
    """``image_embeds``: (B, D) with ``mapping_input="pooled"``, (B, N, D) with ``"tokens"``; finite floats."""
    d = config.image_embed_dim
    tokens = config.mapping_input == "tokens"
    shape = f"(batch, tokens, {d})" if tokens else f"(batch, {d})"
    if not torch.is_tensor(image_embeds) or not image_embeds.is_floating_point():
        raise ValueError(f"`image_embeds` must be a floating-point tensor of shape {shape}.")
    if image_embeds.ndim != (3 if tokens else 2) or image_embeds.shape[-1] != d:
        raise ValueError(
            f"`image_embeds` must have shape {shape} (mapping_input={config.mapping_input!r}), got "
            f"{tuple(image_embeds.shape)}: the embedding width must match the encoder this model uses."
        )
    if not torch.isfinite(image_embeds).all():
        raise ValueError("`image_embeds` contains NaN or infinite values.")


def check_image_inputs(
    config: Any, has_tower: bool, pixel_values: torch.Tensor | None, image_embeds: torch.Tensor | None
) -> None:
    """Exactly one of ``pixel_values`` / ``image_embeds``, of the right type, shape and values, and not empty."""
    if (pixel_values is None) == (image_embeds is None):
        got = "both" if pixel_values is not None else "neither"
        raise ValueError(
            f"Give exactly one of `pixel_values` (B, 3, H, W) or `image_embeds` (B, D); got {got}."
        )
    if pixel_values is not None:
        if not has_tower:
            raise ValueError(
                "This ClipCap model has no vision tower (vision_config=None): pass `image_embeds` of width "
                f"{config.image_embed_dim} computed by the image encoder it was trained with."
            )
        _check_pixel_values(config, pixel_values)
    else:
        _check_image_embeds(config, image_embeds)
    if (pixel_values if pixel_values is not None else image_embeds).shape[0] == 0:
        raise ValueError("Got an empty batch (0 images); pass at least one image.")


def _check_positive_ints(kwargs: dict[str, Any]) -> None:
    for name in ("max_new_tokens", "num_beams", "num_return_sequences", "top_k", "max_length"):
        value = kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    min_new = kwargs.get("min_new_tokens")
    if min_new is not None and (not isinstance(min_new, int) or min_new < 0):
        raise ValueError(f"`min_new_tokens` must be a non-negative integer, got {min_new!r}.")


def check_generation_kwargs(config: Any, generation_config: Any, inputs: Any, kwargs: dict[str, Any]) -> None:
    """Clear errors for arguments ``generate`` cannot honour, before any model work."""
    if inputs is not None and (not torch.is_tensor(inputs) or inputs.is_floating_point()):
        raise TypeError(
            "The first positional argument of `generate` is the text prompt `inputs` (token ids, B x L), as for "
            "every transformers model; pass images by keyword: generate(pixel_values=...) or image_embeds=...."
        )
    generation_config = kwargs.get("generation_config") or generation_config
    for name in ASSISTED_DECODING_OPTIONS:
        if kwargs.get(name, getattr(generation_config, name, None)) is not None:
            raise ValueError(
                f"ClipCap does not support assisted / speculative decoding with an assistant model (`{name}`): the "
                "assistant is given the text alone, without the image prefix. Drop it (plain greedy, beam search "
                "or sampling give the same captions), or use `prompt_lookup_num_tokens`, which needs no assistant."
            )
    _check_positive_ints(kwargs)
    temperature, top_p = kwargs.get("temperature"), kwargs.get("top_p")
    if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
    num_beams, nrs = kwargs.get("num_beams") or 1, kwargs.get("num_return_sequences")
    if nrs is not None and not kwargs.get("do_sample", False) and nrs > num_beams:
        raise ValueError(
            f"`num_return_sequences`={nrs} needs `num_beams` >= {nrs} (or `do_sample=True`); got num_beams={num_beams}."
        )
    max_new, limit = kwargs.get("max_new_tokens"), position_limit(config.text_config)
    if max_new is not None and limit is not None and config.prefix_length + max_new > limit[1]:
        raise ValueError(
            f"prefix_length ({config.prefix_length}) + max_new_tokens ({max_new}) exceeds the language model's "
            f"{limit[1]} positions ({limit[0]}); lower max_new_tokens."
        )


def check_text_inputs(
    batch: int,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
) -> None:
    """The text that follows ``batch`` images: ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, E), not both;
    ``attention_mask``, ``position_ids``, ``labels`` and ``shift_labels`` all (B, L)."""
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("Pass the text as `input_ids` or as `inputs_embeds`, not both.")
    if input_ids is not None and (input_ids.ndim != 2 or input_ids.shape[0] != batch):
        raise ValueError(
            f"`input_ids` must have shape ({batch}, L) to match {batch} images, got {tuple(input_ids.shape)}."
        )
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != batch):
        raise ValueError(
            f"`inputs_embeds` must have shape ({batch}, L, E), got {tuple(inputs_embeds.shape)}."
        )
    text = input_ids if input_ids is not None else inputs_embeds
    text_length = 0 if text is None else text.shape[1]
    for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if value is not None and tuple(value.shape) != (batch, text_length):
            raise ValueError(f"`{name}` must have the shape of the text (B, L) = ({batch}, {text_length}).")
    for name, value in (("labels", labels), ("shift_labels", shift_labels)):
        if value is not None and tuple(value.shape) != (batch, text_length):
            raise ValueError(
                f"`{name}` must have the shape of the text {(batch, text_length)}; -100 marks ignored positions."
            )


def check_prompt_inputs(
    batch: int,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> None:
    """``generate``'s prompt after ``batch`` images: ``input_ids`` (B, L) and / or ``inputs_embeds`` (B, L, E) (both:
    the same L tokens, the ids naming them in the result); ``attention_mask`` and ``position_ids`` (B, L)."""
    if input_ids is not None or inputs_embeds is None:
        check_text_inputs(batch, input_ids, None, attention_mask, position_ids)
    if inputs_embeds is not None:
        check_text_inputs(batch, None, inputs_embeds, attention_mask, position_ids)
    if input_ids is not None and inputs_embeds is not None and input_ids.shape[1] != inputs_embeds.shape[1]:
        raise ValueError(
            f"`input_ids` {tuple(input_ids.shape)} and `inputs_embeds` {tuple(inputs_embeds.shape)} must be the same "
            "prompt: give the same number of tokens (or only one of them)."
        )


__all__ = [
    "ASSISTED_DECODING_OPTIONS",
    "check_generation_kwargs",
    "check_image_inputs",
    "check_prompt_inputs",
    "check_text_inputs",
]
