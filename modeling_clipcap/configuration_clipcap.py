"""Configuration of ClipCap: an image tower, a mapping network and a causal language model.

``ClipCapConfig`` is a transformers composite configuration:

* ``vision_config``: the config of a supported image tower (CLIP vision by default; SigLIP, SigLIP2, DINOv2,
  ViT, ConvNeXt, ConvNeXt V2, ResNet: ``towers.VISION_FAMILIES``; a full CLIP / SigLIP config gives its
  vision part), or ``None`` for an embeddings-only model that takes ``image_embeds`` of width
  ``image_embed_dim`` (features from any encoder, e.g. the original RN50x4 checkpoints).
* ``text_config``: the config of a decoder-only causal LM (GPT-2 by default; Llama, Qwen2, Qwen3, OPT,
  GPT-NeoX, Gemma tested).
* the ClipCap fields below (mapping network, prefix and freezing).
"""

from __future__ import annotations

from .compat import require_supported_transformers  # noqa: F401  (fails clearly outside the supported range)
from .towers import (
    check_language_config,
    image_embed_dim,
    position_limit,
    text_embed_dim,
    vision_family,
    vision_tower_config,
)

# isort: split
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


@strict
class ClipCapConfig(PreTrainedConfig):
    r"""Configuration of [`ClipCapForConditionalGeneration`].

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The image tower (any family of ``towers.VISION_FAMILIES``). ``None`` together with ``image_embed_dim``
            builds an embeddings-only model; ``None`` without ``image_embed_dim`` builds the default CLIP ViT-B/32.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            A decoder-only causal language model (built with ``AutoModelForCausalLM``). Defaults to GPT-2 small.
        mapping_type (`"mlp"` or `"transformer"`, defaults to `"mlp"`):
            ``"mlp"``: Linear(D, E*K/2) -> Tanh -> Linear(E*K/2, E*K) (paper's "MLP + GPT-2 tuning").
            ``"transformer"``: Linear(D, clip_length*E) plus a learned constant of K vectors through
            ``mapping_num_layers`` pre-LN transformer layers; the output is the constant's K positions.
        mapping_input (`"pooled"` or `"tokens"`, defaults to `"pooled"`): what the mapper reads. ``"pooled"``: one
            image embedding (B, D) per image (the paper). ``"tokens"``: the tower's token / patch features
            (B, N, D) (a CNN's feature map flattened), attended over by the transformer mapper instead of
            ``clip_length`` projected copies of one vector; needs ``mapping_type="transformer"``.
        mapping_num_tokens (`int`, *optional*): with ``mapping_input="tokens"``, N, the number of token features
            the tower gives (a CNN's feature-map cells, a ViT's patches and class token). When set, the transformer
            mapper adds a learned position embedding (N, E) to the projected tokens, so that it knows where each
            token is (its attention alone is blind to order); ``None`` (models saved before this option): none.
        prefix_length (`int`, defaults to 10): K, the number of prefix vectors given to the language model.
        clip_length (`int`, defaults to 10): number of vectors the image embedding is expanded to (transformer
            mapper with ``mapping_input="pooled"`` only).
        mapping_num_layers (`int`, defaults to 8): transformer mapper depth.
        mapping_num_heads (`int`, defaults to 8): transformer mapper attention heads; must divide the LM's width E.
        mapping_mlp_ratio (`float`, defaults to 2.0): transformer mapper MLP hidden width / E.
        mapping_hidden_size (`int`, *optional*): MLP mapper hidden width; defaults to E*K/2 as in the paper.
        image_embed_dim (`int`, *optional*): D, width of what the mapper reads. Derived from the vision tower (per
            family, ``towers.image_embed_dim``; CLIP: ``projection_dim``); required when ``vision_config`` is ``None``.
        normalize_prefix (`bool`, defaults to `False`): L2-normalise each image embedding before the mapper.
        freeze_vision (`bool`, defaults to `True`): the image tower gets no gradients and stays in eval mode.
        freeze_language_model (`bool`, defaults to `False`): the language model gets no weight gradients and stays in eval
            mode (the paper's transformer recipe); gradients still reach the prefix through its activations.
        retrieval_k (`int`, defaults to 0): retrieval augmentation (SmallCap): the number of captions retrieved for
            each image from a datastore and given to the language model as a text prompt after the prefix. 0: off
            (the paper's model); the captions come from the processor (``processor(images, datastore=...)``).
        retrieval_template (`str`, defaults to `"Similar images show {captions} This image shows"`): the prompt;
            ``{captions}`` becomes the retrieved captions joined by spaces (``processing_clipcap.retrieval_prompt``).
        joint_embed_dim (`int`, *optional*): a linear projection (no bias) of the tower's pooled embedding to
            this width, into the joint image-text space the mapper reads (a tower saved without its projection, e.g.
            the demo's ResNet for text-only training); ``None``: none (the tower's own embedding).

    Example:

    ```python
    >>> from transformers import CLIPVisionConfig, GPT2Config
    >>> from modeling_clipcap import ClipCapConfig
    >>> config = ClipCapConfig(
    ...     vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                    num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
    ...     text_config=GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100),
    ...     prefix_length=4,
    ... )
    >>> config.image_embed_dim
    16
    ```
    """

    model_type = "clipcap"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", optional=True
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    mapping_type: Literal["mlp", "transformer"] = "mlp"
    mapping_input: Literal["pooled", "tokens"] = "pooled"
    mapping_num_tokens: int | None = None
    prefix_length: int = 10
    clip_length: int = 10
    mapping_num_layers: int = 8
    mapping_num_heads: int = 8
    mapping_mlp_ratio: float = 2.0
    mapping_hidden_size: int | None = None
    image_embed_dim: int | None = None
    normalize_prefix: bool = False
    freeze_vision: bool = True
    freeze_language_model: bool = False
    retrieval_k: int = 0
    retrieval_template: str = "Similar images show {captions} This image shows"
    joint_embed_dim: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.vision_config is None and self.image_embed_dim is None:
            # Neither a vision tower nor an embedding width: the paper's CLIP ViT-B/32 tower.
            self.vision_config = {"model_type": "clip_vision_model"}
        super().__post_init__(**kwargs)
        if self.vision_config is not None:
            self.vision_config = vision_tower_config(self.vision_config)
            family = vision_family(self.vision_config)
            derived = image_embed_dim(self.vision_config, self.mapping_input)
            if self.joint_embed_dim is not None:
                derived = self.joint_embed_dim
            if self.image_embed_dim is None:
                self.image_embed_dim = derived
            elif self.image_embed_dim != derived:
                raise ValueError(
                    f"image_embed_dim={self.image_embed_dim} does not match the vision tower's width "
                    f"{family.pooled_width if self.mapping_input == 'pooled' else family.token_width}={derived} "
                    f"(mapping_input={self.mapping_input!r}); leave image_embed_dim unset when a vision_config is given."
                )
        if self.text_config is not None and not isinstance(self.text_config, dict):
            check_language_config(self.text_config)
        # Raise a plain ValueError at construction (the @strict validator below re-checks on assignment).
        self.validate_clipcap_fields()

    def validate_clipcap_fields(self) -> None:
        """Reject values the model cannot be built with (runs as a ``@strict`` validator)."""
        if self.mapping_type not in ("mlp", "transformer"):
            raise ValueError(f"mapping_type must be 'mlp' or 'transformer', got {self.mapping_type!r}.")
        if self.mapping_input not in ("pooled", "tokens"):
            raise ValueError(f"mapping_input must be 'pooled' or 'tokens', got {self.mapping_input!r}.")
        if self.mapping_input == "tokens" and self.mapping_type != "transformer":
            raise ValueError(
                "mapping_input='tokens' needs mapping_type='transformer' (the MLP mapper reads one vector per image)."
            )
        if self.mapping_num_tokens is not None:
            if self.mapping_input != "tokens":
                raise ValueError(
                    "mapping_num_tokens (token position embeddings) needs mapping_input='tokens'; leave it unset "
                    "for the pooled embedding."
                )
            value = self.mapping_num_tokens
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mapping_num_tokens must be a positive integer, got {value!r}.")
        for name in ("prefix_length", "clip_length", "mapping_num_layers", "mapping_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.mapping_mlp_ratio <= 0:
            raise ValueError(f"mapping_mlp_ratio must be > 0, got {self.mapping_mlp_ratio!r}.")
        if self.mapping_hidden_size is not None and self.mapping_hidden_size < 1:
            raise ValueError(
                f"mapping_hidden_size must be a positive integer, got {self.mapping_hidden_size!r}."
            )
        if (
            isinstance(self.retrieval_k, bool)
            or not isinstance(self.retrieval_k, int)
            or self.retrieval_k < 0
        ):
            raise ValueError(
                f"retrieval_k must be an integer >= 0 (0: no retrieval), got {self.retrieval_k!r}."
            )
        if "{captions}" not in str(self.retrieval_template):
            raise ValueError(
                f"retrieval_template must contain '{{captions}}' (where the retrieved captions go), got "
                f"{self.retrieval_template!r}."
            )
        if self.joint_embed_dim is not None and (
            self.joint_embed_dim < 1 or self.mapping_input != "pooled" or self.vision_config is None
        ):
            raise ValueError(
                f"joint_embed_dim={self.joint_embed_dim!r} needs a positive width, a vision tower and "
                "mapping_input='pooled' (it projects the pooled image embedding)."
            )
        if self.image_embed_dim is not None and self.image_embed_dim < 1:
            raise ValueError(f"image_embed_dim must be a positive integer, got {self.image_embed_dim!r}.")
        text = self.text_config
        if text is not None and not isinstance(text, dict):
            width = text_embed_dim(text)
            if self.mapping_type == "transformer" and width % self.mapping_num_heads != 0:
                raise ValueError(
                    f"mapping_num_heads={self.mapping_num_heads} must divide the language model's width "
                    f"hidden_size={width} for the transformer mapper."
                )
            limit = position_limit(text)
            if limit is not None and self.prefix_length >= limit[1]:
                raise ValueError(
                    f"prefix_length={self.prefix_length} leaves no room for a caption in the language model's "
                    f"{limit[0]}={limit[1]}."
                )

    @property
    def hidden_size(self) -> int:
        """The language model's width E (the size of each prefix vector)."""
        return text_embed_dim(self.text_config)


__all__ = ["ClipCapConfig"]
