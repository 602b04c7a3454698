"""The image towers and language models ClipCap plugs in, and what it reads from each.

ClipCap talks to its two pretrained parts through this file only:

* an image tower, built with ``AutoModel.from_config`` (CLIP: ``CLIPVisionModelWithProjection``), gives
  :func:`image_features`: a pooled image embedding (B, D) for ``mapping_input="pooled"`` and token /
  patch features (B, N, D) for ``mapping_input="tokens"``. :data:`VISION_FAMILIES` says per family which
  output is "the image embedding" and how wide it is;
* a decoder-only causal LM, built with ``AutoModelForCausalLM.from_config``, used through public methods
  (``get_input_embeddings``, ``get_output_embeddings``, ``base_model``) and its config's position limit.
  :data:`FAST_PATH_LANGUAGE_FAMILIES` are the families whose causal-LM head is a plain bias-free linear
  layer over the body's last hidden state and whose cache is a ``DynamicCache``: ClipCap's CPU speed paths
  (blocked output layer, shared prefill of beams) run there. Any other decoder-only causal LM runs its own
  ``forward`` (logit soft-capping, scaling and special caches stay correct) without those two paths.

This file travels with saved models (``trust_remote_code``): it imports only torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionModelWithProjection,
    PreTrainedConfig,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging


@dataclass(frozen=True)
class VisionFamily:
    """What ClipCap reads from one family of image towers.

    Attributes:
        name: the family as people call it.
        pooled: which output is the pooled image embedding (B, D) ClipCap maps with ``mapping_input="pooled"``.
        pooled_width: config attribute holding D (``hidden_sizes`` means its last entry).
        tokens: which output gives the token features (B, N, D) for ``mapping_input="tokens"``.
        token_width: config attribute holding their width.
        pixels: ``"square"`` (B, C, image_size, image_size), ``"any"`` (B, C, H, W) or ``"patches"``
            (B, N, C * patch_size**2, with ``pixel_attention_mask`` and ``spatial_shapes``).
        image_processor: the family's own image processor class (PIL backend), used when a tower comes without a
            saved one (:func:`default_image_processor`).
        resize: how that processor is sized from the config: ``"crop"`` (short side, then a centre crop),
            ``"square"`` (both sides), ``"short_side"`` (ConvNeXt's resize with ``crop_pct``) or ``"patches"``.
    """

    name: str
    pooled: str
    pooled_width: str
    tokens: str
    token_width: str
    pixels: str
    image_processor: str = "CLIPImageProcessorPil"
    resize: str = "crop"


_VIT_TOKENS = "`last_hidden_state` (B, 1 + patches, hidden): the CLS token and the patches"
_CNN_TOKENS = "`last_hidden_state` (B, C, h, w) flattened to (B, h*w, C)"

#: Supported image towers by ``model_type``: the image embedding of each (also the table in docs/architecture.md).
VISION_FAMILIES: dict[str, VisionFamily] = {
    "clip_vision_model": VisionFamily(
        "CLIP", "`image_embeds`: the projected embedding (CLIP's encode_image)", "projection_dim",
        _VIT_TOKENS, "hidden_size", "square",
    ),
    "siglip_vision_model": VisionFamily(
        "SigLIP", "`pooler_output`: the attention-pooling head (needs vision_use_head=True)", "hidden_size",
        "`last_hidden_state` (B, patches, hidden)", "hidden_size", "square", "SiglipImageProcessorPil", "square",
    ),
    "siglip2_vision_model": VisionFamily(
        "SigLIP2 (NaFlex)", "`pooler_output`: the attention-pooling head (needs vision_use_head=True)",
        "hidden_size", "`last_hidden_state` (B, patches, hidden); padded patches included", "hidden_size",
        "patches", "Siglip2ImageProcessorPil", "patches",
    ),
    "dinov2": VisionFamily(
        "DINOv2", "`pooler_output`: the CLS token after the final layer norm", "hidden_size", _VIT_TOKENS,
        "hidden_size", "square", "BitImageProcessorPil", "crop",
    ),
    "vit": VisionFamily(
        "ViT", "the CLS token of `last_hidden_state` after the final layer norm (ViT's untrained tanh pooler "
        "is not built)", "hidden_size", _VIT_TOKENS, "hidden_size", "square", "ViTImageProcessorPil", "square",
    ),
    "convnext": VisionFamily(
        "ConvNeXt", "`pooler_output`: global average pool + layer norm", "hidden_sizes", _CNN_TOKENS,
        "hidden_sizes", "any", "ConvNextImageProcessorPil", "short_side",
    ),
    "convnextv2": VisionFamily(
        "ConvNeXt V2", "`pooler_output`: global average pool + layer norm", "hidden_sizes", _CNN_TOKENS,
        "hidden_sizes", "any", "ConvNextImageProcessorPil", "short_side",
    ),
    "resnet": VisionFamily(
        "ResNet", "`pooler_output` (B, C, 1, 1): global average pool, flattened", "hidden_sizes", _CNN_TOKENS,
        "hidden_sizes", "any", "ConvNextImageProcessorPil", "short_side",
    ),
}  # fmt: skip

#: Causal-LM families tested with ClipCap whose head is a bias-free linear layer on the body's last hidden state
#: and whose cache is a DynamicCache: the CPU speed paths run for them (see the module docstring).
FAST_PATH_LANGUAGE_FAMILIES = (
    "gpt2", "llama", "qwen2", "qwen3", "opt", "gpt_neox", "gemma",
)  # fmt: skip

#: Full (image + text) checkpoints whose vision tower ClipCap takes: model_type -> the tower's model_type.
DUAL_ENCODER_FAMILIES = {
    "clip": "clip_vision_model",
    "siglip": "siglip_vision_model",
    "siglip2": "siglip2_vision_model",
}


def _supported_vision() -> str:
    return ", ".join(f"{f.name} ({t})" for t, f in VISION_FAMILIES.items())


def vision_family(config: PreTrainedConfig) -> VisionFamily:
    """The :class:`VisionFamily` of a tower config; a clear ``ValueError`` for any other config."""
    family = VISION_FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(
            f"vision_config has model_type {getattr(config, 'model_type', None)!r}, which is not a supported image "
            f"tower. Supported: {_supported_vision()}; a full CLIP / SigLIP / SigLIP2 config gives its vision tower. "
            "For features from another encoder, set vision_config=None and image_embed_dim and pass image_embeds."
        )
    return family


def vision_tower_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision tower's config: ``config`` itself, or the vision part of a full CLIP / SigLIP / SigLIP2 config
    (a CLIP one keeps the top-level ``projection_dim``, where CLIP stores the width of ``image_embeds``)."""
    if getattr(config, "model_type", None) not in DUAL_ENCODER_FAMILIES:
        return config
    vision = config.vision_config
    if config.model_type == "clip":
        vision.projection_dim = config.projection_dim
    return vision


def _width(config: PreTrainedConfig, attribute: str) -> int:
    value = getattr(config, attribute)
    return int(value[-1]) if attribute == "hidden_sizes" else int(value)


def image_embed_dim(config: PreTrainedConfig, mapping_input: str) -> int:
    """D: width of what the mapper consumes: the pooled embedding (B, D) or the token features (B, N, D)."""
    family = vision_family(config)
    if mapping_input == "pooled":
        if getattr(config, "vision_use_head", True) is False:
            raise ValueError(
                f"This {family.name} tower is configured without its pooling head (vision_use_head=False), so it "
                "has no pooled image embedding: use mapping_input='tokens' with mapping_type='transformer', or a "
                "tower with a pooled output. Supported towers with mapping_input='pooled': "
                + _supported_vision()
            )
        return _width(config, family.pooled_width)
    return _width(config, family.token_width)


def build_vision_tower(config: PreTrainedConfig) -> nn.Module:
    """The tower of ``config``: CLIP with its projection, ViT without its untrained pooler, others as AutoModel."""
    vision_family(config)
    if config.model_type == "clip_vision_model":
        return CLIPVisionModelWithProjection(config)
    if config.model_type == "vit":
        return AutoModel.from_config(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def load_pretrained_tower(path: str, **load_kwargs: Any) -> nn.Module:
    """A supported image tower with pretrained weights from ``path`` (a tower checkpoint, or a full CLIP / SigLIP /
    SigLIP2 checkpoint whose vision part is taken). Refuses checkpoints that would leave tower weights random.

    ``load_kwargs``: ``from_pretrained`` options (``dtype``, ``revision``, ``cache_dir``, ``token``...).
    """
    config_kwargs = {k: v for k, v in load_kwargs.items() if k not in ("dtype", "torch_dtype")}
    full = AutoConfig.from_pretrained(path, **config_kwargs)
    config = vision_tower_config(full)
    vision_family(config)
    if config.model_type == "clip_vision_model":
        tower_class, extra = CLIPVisionModelWithProjection, {}
    else:
        tower_class, extra = AutoModel, ({"add_pooling_layer": False} if config.model_type == "vit" else {})
    verbosity = hf_logging.get_verbosity()
    if (
        config is not full
    ):  # the text tower's weights are expected leftovers: don't print them as "UNEXPECTED"
        hf_logging.set_verbosity_error()
    try:
        tower, info = tower_class.from_pretrained(
            path, config=config, output_loading_info=True, **extra, **load_kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if "visual_projection.weight" in missing:
        raise ValueError(
            f"{path} has no visual projection (visual_projection.weight); ClipCap needs CLIP's projected image_embeds: "
            "give a full CLIP or a CLIPVisionModelWithProjection checkpoint."
        )
    if missing:
        raise ValueError(
            f"{path} lacks {config.model_type} tower weights {missing[:5]} ({len(missing)} missing); give a checkpoint "
            f"of the tower itself or a full CLIP / SigLIP checkpoint. Supported towers: {_supported_vision()}."
        )
    return tower


def default_image_processor(config: PreTrainedConfig) -> Any:
    """The tower family's own image processor (PIL backend), sized from the tower's config: for a tower whose
    checkpoint has no saved image processor. Square towers and CNNs get the config's ``image_size`` (ResNet
    configs have none: 224), SigLIP2 its ``patch_size`` and ``num_patches``; DINOv2 ImageNet statistics."""
    import transformers

    family = vision_family(config)
    kwargs: dict[str, Any] = {}
    size = int(getattr(config, "image_size", None) or 224)
    if family.resize == "patches":
        kwargs = {"patch_size": config.patch_size, "max_num_patches": config.num_patches}
    elif family.resize == "crop":
        kwargs = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    elif family.resize == "square":
        kwargs = {"size": {"height": size, "width": size}}
    else:  # ConvNeXt's processor: below 384 it resizes the short side to size / crop_pct, then crops to size
        kwargs = {"size": {"shortest_edge": size}}
    if config.model_type == "dinov2":
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        kwargs.update(image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    return getattr(transformers, family.image_processor)(**kwargs)


def check_pixel_values(config: PreTrainedConfig, pixel_values: Any) -> None:
    """Refuse ``pixel_values`` that are not finite floats in the layout of the tower family of ``config``:
    (B, C, image_size, image_size) for square towers, (B, C, H, W) for CNNs, (B, N, C * patch_size**2) patches
    for SigLIP2."""
    if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
        kind = type(pixel_values).__name__ if not torch.is_tensor(pixel_values) else pixel_values.dtype
        raise ValueError(
            f"`pixel_values` must be a floating-point tensor, got {kind}; use the model's processor to turn images "
            "into pixel values."
        )
    layout, shape = vision_family(config).pixels, tuple(pixel_values.shape)
    if layout == "patches":
        if pixel_values.ndim != 3:
            raise ValueError(
                f"`pixel_values` of a {config.model_type} tower must be patches (batch, patches, channels * "
                f"patch_size**2), got {shape}; use the model's processor."
            )
    elif layout == "square":
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or shape[1:] != expected:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{shape}; use the model's processor to resize and normalise images."
            )
    elif pixel_values.ndim != 4 or shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` must have shape (batch, {config.num_channels}, height, width), got {shape}; use the "
            "model's processor to resize and normalise images."
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError(
            "`pixel_values` contains NaN or infinite values; use the model's processor on the images (it gives "
            "finite, normalised values)."
        )


def tower_dtype(tower: nn.Module) -> torch.dtype:
    """The dtype the tower's weights are stored in (pixels are cast to it)."""
    return next(tower.parameters()).dtype


def image_features(
    tower: nn.Module, config: PreTrainedConfig, pixel_values: torch.Tensor, **kwargs: Any
) -> BaseModelOutputWithPooling:
    """Run ``tower`` on ``pixel_values`` and read the family's outputs.

    Returns ``pooler_output`` (B, D_pooled) (``None`` for a SigLIP tower without its head), ``last_hidden_state``
    (B, N, D_tokens) (a CNN's (B, C, h, w) map flattened to (B, h*w, C)), and the tower's ``hidden_states`` /
    ``attentions`` when asked. ``kwargs``: ``output_hidden_states``, ``output_attentions``, and SigLIP2's
    ``pixel_attention_mask`` (B, N) and ``spatial_shapes`` (B, 2).
    """
    vision_family(config)
    model_type = config.model_type
    out = tower(pixel_values=pixel_values, return_dict=True, **kwargs)
    tokens = out.last_hidden_state
    if tokens.ndim == 4:  # CNN feature map (B, C, h, w)
        tokens = tokens.flatten(2).transpose(1, 2)
    if model_type == "clip_vision_model":
        pooled = out.image_embeds
    elif model_type == "vit":
        pooled = out.last_hidden_state[:, 0]
    else:
        pooled = getattr(out, "pooler_output", None)
        pooled = pooled.flatten(1) if pooled is not None else None
    return BaseModelOutputWithPooling(
        last_hidden_state=tokens,
        pooler_output=pooled,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )


def check_language_config(config: PreTrainedConfig) -> None:
    """Refuse a ``text_config`` that is not a decoder-only causal LM, naming the tested families."""
    model_type = getattr(config, "model_type", None)
    tested = ", ".join(FAST_PATH_LANGUAGE_FAMILIES)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"text_config has model_type {model_type!r}, an encoder-decoder model; ClipCap continues a prefix with a "
            f"decoder-only causal language model. Use one of {tested} (or another AutoModelForCausalLM decoder)."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"text_config has model_type {model_type!r}, which is not a causal language model "
            f"(AutoModelForCausalLM does not know it). Use a decoder-only causal LM: {tested}, ..."
        )


def build_language_model(config: PreTrainedConfig) -> nn.Module:
    """The causal LM of ``config`` (``AutoModelForCausalLM.from_config``)."""
    check_language_config(config)
    return AutoModelForCausalLM.from_config(config)


def has_fast_paths(config: PreTrainedConfig) -> bool:
    """Whether ClipCap may run this LM's body and output layer itself (see :data:`FAST_PATH_LANGUAGE_FAMILIES`)."""
    return getattr(config, "model_type", None) in FAST_PATH_LANGUAGE_FAMILIES


def text_embed_dim(config: PreTrainedConfig) -> int:
    """E: width of the LM's input embeddings, the width of each prefix vector (OPT may embed narrower than its
    hidden size: ``word_embed_proj_dim``)."""
    return int(getattr(config, "word_embed_proj_dim", None) or config.hidden_size)


def position_limit(config: PreTrainedConfig) -> tuple[str, int] | None:
    """``(attribute name, value)`` of the LM's position limit (GPT-2: ``n_positions``), or ``None``."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return name, value
    return None


__all__ = [
    "DUAL_ENCODER_FAMILIES",
    "FAST_PATH_LANGUAGE_FAMILIES",
    "VISION_FAMILIES",
    "VisionFamily",
    "build_language_model",
    "build_vision_tower",
    "check_language_config",
    "check_pixel_values",
    "default_image_processor",
    "has_fast_paths",
    "image_embed_dim",
    "image_features",
    "load_pretrained_tower",
    "position_limit",
    "text_embed_dim",
    "tower_dtype",
    "vision_family",
    "vision_tower_config",
]
