"""ClipCap: CLIP prefix captioning on transformers building blocks.

Data flow (B images, K = ``prefix_length``, D = ``image_embed_dim``, E = GPT-2 width, L = caption tokens)::

    pixel_values (B, 3, H, W) -> CLIPVisionModelWithProjection -> image_embeds (B, D)
    image_embeds (B, D) -> [optional per-vector L2 norm] -> mapping network -> prefix (B, K, E)
    [prefix ; wte(input_ids)] (B, K + L, E) -> GPT2LMHeadModel -> logits (B, K + L, V)

The CLIP tower and GPT-2 are the unmodified transformers classes; this file adds the two mapping
networks of the paper and wires generation through ``GenerationMixin`` with ``inputs_embeds``.
"""

from __future__ import annotations

from .compat import CACHE_KWARG, cache_kwargs, output_cache, pop_cache_argument  # checks transformers first

# isort: split
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionModelWithProjection,
    GenerationMixin,
    GPT2LMHeadModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.generation.logits_process import LogitsProcessorList
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from .configuration_clipcap import ClipCapConfig
from .fast_decoding import blocked_output_layer, swap_min_length_processors

# ---------------------------------------------------------------------------------------------------------
# Mapping networks
# ---------------------------------------------------------------------------------------------------------


class ClipCapMLPMapper(nn.Module):
    """The paper's MLP mapper: Linear(D, E*K/2) -> Tanh -> Linear(E*K/2, E*K), reshaped to (K, E).

    Input ``image_embeds`` (B, D); output prefix (B, K, E).
    """

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        self.prefix_length = config.prefix_length
        self.hidden_size = config.hidden_size
        out_features = self.hidden_size * self.prefix_length
        hidden = config.mapping_hidden_size or out_features // 2
        self.layers = nn.Sequential(
            nn.Linear(config.image_embed_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K, E)."""
        return self.layers(image_embeds).view(image_embeds.shape[0], self.prefix_length, self.hidden_size)


class ClipCapMapperAttention(nn.Module):
    """Unmasked multi-head self-attention of the transformer mapper.

    Queries and keys/values come from bias-free projections (keys then values in one (2E, E) matrix,
    as in the original ``to_keys_values``); the output projection has a bias. (B, N, E) -> (B, N, E).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.kv_proj = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, e = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(hidden_states).split(e, dim=-1)
        k = k.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim), scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, e))


class ClipCapMapperMLP(nn.Module):
    """Feed-forward block of the transformer mapper: Linear(E, r*E) -> ReLU -> Linear(r*E, E)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(hidden_states)))


class ClipCapMapperLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x)). (B, N, E) -> (B, N, E)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = ClipCapMapperAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = ClipCapMapperMLP(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class ClipCapTransformerMapper(nn.Module):
    """The paper's transformer mapper.

    ``image_embeds`` (B, D) -> Linear -> (B, clip_length, E), concatenated with a learned constant (K, E)
    -> ``mapping_num_layers`` pre-LN layers over clip_length + K tokens -> the constant's K positions
    (B, K, E).
    """

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        e = config.hidden_size
        self.clip_length = config.clip_length
        self.hidden_size = e
        self.linear = nn.Linear(config.image_embed_dim, config.clip_length * e)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, e))
        self.layers = nn.ModuleList(
            ClipCapMapperLayer(e, config.mapping_num_heads, config.mapping_mlp_ratio)
            for _ in range(config.mapping_num_layers)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K, E)."""
        b = image_embeds.shape[0]
        clip_tokens = self.linear(image_embeds).view(b, self.clip_length, self.hidden_size)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(clip_tokens.dtype)
        hidden_states = torch.cat([clip_tokens, const], dim=1)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states[:, self.clip_length :]


MAPPING_NETWORKS: dict[str, type[nn.Module]] = {
    "mlp": ClipCapMLPMapper,
    "transformer": ClipCapTransformerMapper,
}


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ClipCapOutput(CausalLMOutputWithPast):
    """Output of [`ClipCapForConditionalGeneration.forward`]: transformers' causal-LM output plus the prefix.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): caption cross-entropy (only when ``labels`` given).
        logits (`torch.FloatTensor` of shape `(B, S, V)`): GPT-2 logits, S = K + L positions when a prefix
            is present (or the last ``logits_to_keep`` positions).
        cache (`Cache`, *optional*): GPT-2's key/value cache; named ``past_key_values`` under transformers
            < 5.24 (the field is inherited, so it carries the installed release's name, see ``compat.py``).
        prefix_embeds (`torch.FloatTensor` of shape `(B, K, E)`, *optional*): the mapped prefix.
        image_embeds (`torch.FloatTensor` of shape `(B, D)`, *optional*): the CLIP image embedding used.
    """

    prefix_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


class ClipCapPreTrainedModel(PreTrainedModel):
    """Weight initialisation, attention back-ends and checkpointing shared by ClipCap models."""

    config: ClipCapConfig
    config_class = ClipCapConfig
    base_model_prefix = "clipcap"
    main_input_name = "input_ids"  # generation runs GPT-2 on inputs_embeds; images enter via generate()
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block", "CLIPEncoderLayer", "ClipCapMapperLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ClipCapTransformerMapper):
            init.normal_(module.prefix_const, mean=0.0, std=1.0)  # torch.randn, as in the paper's code
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class ClipCapForConditionalGeneration(ClipCapPreTrainedModel, GenerationMixin):
    """CLIP vision tower + mapping network + GPT-2, generating captions.

    Sub-modules: ``vision_model`` (`CLIPVisionModelWithProjection`, absent for an embeddings-only config),
    ``mapping_network`` (`ClipCapMLPMapper` or `ClipCapTransformerMapper`) and ``language_model``
    (`GPT2LMHeadModel`).

    Example:

    ```python
    >>> import torch
    >>> from transformers import CLIPVisionConfig, GPT2Config
    >>> from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration
    >>> config = ClipCapConfig(
    ...     vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                    num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
    ...     text_config=GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, eos_token_id=99),
    ...     prefix_length=4,
    ... )
    >>> model = ClipCapForConditionalGeneration(config).eval()
    >>> ids = model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=5, do_sample=False)
    >>> ids.shape[0]
    2
    ```
    """

    _tied_weights_keys = {"language_model.lm_head.weight": "language_model.transformer.wte.weight"}

    def __init__(self, config: ClipCapConfig):
        super().__init__(config)
        if config.vision_config is not None:
            self.vision_model = CLIPVisionModelWithProjection(config.vision_config)
        else:
            self.vision_model = None
        self.mapping_network = MAPPING_NETWORKS[config.mapping_type](config)
        self.language_model = GPT2LMHeadModel(config.text_config)
        self.post_init()
        self._apply_freezing()

    # ------------------------------------------------------------------ freezing

    def _apply_freezing(self) -> None:
        if self.vision_model is not None and self.config.freeze_vision:
            self.vision_model.requires_grad_(False)
            self.vision_model.eval()
        if self.config.freeze_language_model:
            self.language_model.requires_grad_(False)
            self.language_model.eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` that re-applies the config's freezing to the loaded weights."""
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, ClipCapForConditionalGeneration):
            model._apply_freezing()
        elif isinstance(model, tuple) and isinstance(model[0], ClipCapForConditionalGeneration):
            model[0]._apply_freezing()
        return model

    def train(self, mode: bool = True) -> ClipCapForConditionalGeneration:
        """Like ``nn.Module.train`` but frozen sub-models stay in eval mode (no dropout)."""
        super().train(mode)
        if self.vision_model is not None and self.config.freeze_vision:
            self.vision_model.eval()
        if self.config.freeze_language_model:
            self.language_model.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should get: those not frozen by the config (mapping network,
        plus GPT-2 unless ``freeze_language_model``, plus CLIP unless ``freeze_vision``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_parameter_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Trainable parameters split into AdamW groups: biases and norm weights get no weight decay."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_norm = ".ln_" in name or "norm" in name or "layer_norm" in name
            (no_decay if name.endswith("bias") or is_norm or param.ndim < 2 else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ embeddings plumbing

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model

    # ------------------------------------------------------------------ image -> prefix

    def _check_image_inputs(
        self, pixel_values: torch.Tensor | None, image_embeds: torch.Tensor | None
    ) -> int:
        """Validate the image input before any heavy work; returns the batch size."""
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError(
                "Give exactly one of `pixel_values` (B, 3, H, W) or `image_embeds` (B, D); got "
                f"{'both' if pixel_values is not None else 'neither'}."
            )
        if pixel_values is not None:
            if self.vision_model is None:
                raise ValueError(
                    "This ClipCap model has no vision tower (vision_config=None): pass `image_embeds` of width "
                    f"{self.config.image_embed_dim} computed by the image encoder it was trained with."
                )
            if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
                raise ValueError(
                    f"`pixel_values` must be a floating-point tensor, got {type(pixel_values).__name__}"
                    f"{'' if not torch.is_tensor(pixel_values) else ' of dtype ' + str(pixel_values.dtype)}; "
                    "use the model's processor to turn images into pixel values."
                )
            vc = self.config.vision_config
            expected = (vc.num_channels, vc.image_size, vc.image_size)
            if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
                raise ValueError(
                    f"`pixel_values` must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), got "
                    f"{tuple(pixel_values.shape)}; use the model's processor to resize and normalise images."
                )
            if not torch.isfinite(pixel_values).all():
                raise ValueError(
                    "`pixel_values` contains NaN or infinite values; use the model's processor on the images "
                    "(it gives finite, normalised values)."
                )
            batch = pixel_values.shape[0]
        else:
            if not torch.is_tensor(image_embeds) or not image_embeds.is_floating_point():
                raise ValueError(
                    "`image_embeds` must be a floating-point tensor of shape (batch, image_embed_dim)."
                )
            if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.image_embed_dim:
                raise ValueError(
                    f"`image_embeds` must have shape (batch, {self.config.image_embed_dim}), got "
                    f"{tuple(image_embeds.shape)}: the embedding width must match the encoder this model uses."
                )
            if not torch.isfinite(image_embeds).all():
                raise ValueError("`image_embeds` contains NaN or infinite values.")
            batch = image_embeds.shape[0]
        if batch == 0:
            raise ValueError("Got an empty batch (0 images); pass at least one image.")
        return batch

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's projected image embedding (``encode_image``): (B, 3, H, W) -> (B, D)."""
        if self.vision_model is None:
            raise ValueError("This ClipCap model has no vision tower; it takes `image_embeds` directly.")
        vision_dtype = self.vision_model.visual_projection.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            return self.vision_model(pixel_values=pixel_values.to(vision_dtype)).image_embeds

    def get_prefix(
        self, pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map images to GPT-2 prefix vectors.

        Args:
            pixel_values: (B, 3, H, W), or
            image_embeds: (B, D) precomputed CLIP embeddings.

        Returns:
            ``(prefix, image_embeds)``: prefix (B, K, E) in GPT-2's dtype, image_embeds (B, D).
        """
        self._check_image_inputs(pixel_values, image_embeds)
        if image_embeds is None:
            image_embeds = self.get_image_features(pixel_values)
        mapper_dtype = next(self.mapping_network.parameters()).dtype
        embeds = image_embeds.to(mapper_dtype)
        if self.config.normalize_prefix:
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
        prefix = self.mapping_network(embeds)
        return prefix.to(self.language_model.transformer.wte.weight.dtype), image_embeds

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Any = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ClipCapOutput:
        r"""Caption likelihood of images, or one decoding step.

        With an image (``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D)): the sequence is
        ``[prefix (K) ; input_ids (L)]``. ``attention_mask`` (B, L) covers ``input_ids`` only (prefix
        positions are always attended). ``labels`` (B, L) has the shape of ``input_ids`` with -100 for ignored
        positions; the first caption token is predicted from the last prefix position and prefix positions
        never enter the loss. ``num_items_in_batch`` replaces the token count the summed loss is divided by
        (for exact gradient accumulation / data parallelism).

        Without an image, ``input_ids`` or ``inputs_embeds`` go straight to GPT-2 (decoding steps of
        ``generate``); ``attention_mask`` then covers the whole cached sequence.

        ``cache`` is GPT-2's key/value cache; ``past_key_values`` (its name before transformers 5.24) is
        accepted too.

        Returns a [`ClipCapOutput`] with ``logits`` (B, K + L, V) (or the last ``logits_to_keep`` positions).
        """
        cache = pop_cache_argument(cache, kwargs)
        prefix = None
        prefix_length = 0
        if pixel_values is not None or image_embeds is not None:
            if inputs_embeds is not None:
                raise ValueError(
                    "Pass `inputs_embeds` or an image (`pixel_values`/`image_embeds`), not both."
                )
            prefix, image_embeds = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds)
            batch, prefix_length = prefix.shape[:2]
            if input_ids is not None:
                if input_ids.ndim != 2 or input_ids.shape[0] != batch:
                    raise ValueError(
                        f"`input_ids` must have shape ({batch}, L) to match {batch} images, got {tuple(input_ids.shape)}."
                    )
                text_embeds = self.language_model.transformer.wte(input_ids)
                inputs_embeds = torch.cat([prefix, text_embeds], dim=1)
            else:
                inputs_embeds = prefix
            if attention_mask is not None:
                if input_ids is None or attention_mask.shape != input_ids.shape:
                    raise ValueError("`attention_mask` must have the shape of `input_ids` (B, L).")
                ones = attention_mask.new_ones((batch, prefix_length))
                attention_mask = torch.cat([ones, attention_mask], dim=1)
            if labels is not None and (input_ids is None or labels.shape != input_ids.shape):
                raise ValueError(
                    "`labels` must have the shape of `input_ids` (B, L); use -100 for positions to ignore."
                )
            input_ids = None
        elif labels is not None:
            raise ValueError("`labels` need an image: pass `pixel_values` or `image_embeds` with them.")

        outputs = self.language_model.transformer(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(cache),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, S, E)
        lm_head = self.language_model.lm_head

        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep]
        logits = self._output_layer(kept)

        loss = None
        if labels is not None:
            # Positions K-1 .. K+L-2 predict caption tokens 0 .. L-1: the output layer runs on them only
            # (reusing the full logits when they were computed anyway).
            if isinstance(logits_to_keep, int) and logits_to_keep == 0:
                caption_logits = logits[:, prefix_length - 1 : -1].float()
            else:
                caption_logits = lm_head(hidden_states[:, prefix_length - 1 : -1]).float()
            loss = F.cross_entropy(
                caption_logits.reshape(-1, caption_logits.shape[-1]),
                labels.reshape(-1).to(caption_logits.device),
                ignore_index=-100,
                reduction="sum" if num_items_in_batch is not None else "mean",
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch

        return ClipCapOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            prefix_embeds=prefix,
            image_embeds=image_embeds,
            **cache_kwargs(output_cache(outputs)),
        )

    #: Vocabulary rows per block of the CPU inference output layer (None: one ``lm_head`` call). See
    #: ``_output_layer``.
    cpu_output_layer_block: int | None = 1024

    def _output_layer(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """GPT-2's output layer, (..., E) -> (..., V); in vocabulary blocks when decoding on CPU
        (``fast_decoding.blocked_output_layer``)."""
        return blocked_output_layer(self.language_model.lm_head, hidden_states, self.cpu_output_layer_block)

    # ------------------------------------------------------------------ generation

    def _build_prompt_embeds(
        self,
        prefix: torch.Tensor,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prefix ; prompt]`` embeddings (B, K + L, E) and mask (B, K + L), padding moved to the left.

        A left-padded prompt would leave its padding between prefix and prompt; the rows are reordered so
        that every row reads ``[pad ... pad, prefix, prompt]``, the layout ``generate`` expects.
        """
        batch, k = prefix.shape[:2]
        ones = torch.ones((batch, k), dtype=torch.long, device=prefix.device)
        if input_ids is None:
            return prefix, ones
        if input_ids.ndim != 2 or input_ids.shape[0] != batch:
            raise ValueError(
                f"The prompt `input_ids` must have shape ({batch}, L), got {tuple(input_ids.shape)}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = torch.cat([prefix, self.language_model.transformer.wte(input_ids)], dim=1)
        mask = torch.cat([ones, attention_mask.to(torch.long)], dim=1)
        if bool((mask == 0).any()):
            order = torch.sort(mask, dim=1, stable=True).indices  # pads (0) first, order kept otherwise
            embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds))
            mask = torch.gather(mask, 1, order)
        return embeds, mask

    def _validate_generation_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Clear errors for out-of-range generation arguments, before any model work."""
        positive_ints = ("max_new_tokens", "num_beams", "num_return_sequences", "top_k", "max_length")
        for name in positive_ints:
            value = kwargs.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        min_new = kwargs.get("min_new_tokens")
        if min_new is not None and (not isinstance(min_new, int) or min_new < 0):
            raise ValueError(f"`min_new_tokens` must be a non-negative integer, got {min_new!r}.")
        temperature = kwargs.get("temperature")
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        top_p = kwargs.get("top_p")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
        num_beams = kwargs.get("num_beams") or 1
        nrs = kwargs.get("num_return_sequences")
        do_sample = kwargs.get("do_sample", False)
        if nrs is not None and not do_sample and nrs > num_beams:
            raise ValueError(
                f"`num_return_sequences`={nrs} needs `num_beams` >= {nrs} (or `do_sample=True`); got num_beams={num_beams}."
            )
        max_new = kwargs.get("max_new_tokens")
        n_positions = getattr(self.config.text_config, "n_positions", None)
        if (
            max_new is not None
            and n_positions is not None
            and self.config.prefix_length + max_new > n_positions
        ):
            raise ValueError(
                f"prefix_length ({self.config.prefix_length}) + max_new_tokens ({max_new}) exceeds GPT-2's "
                f"{n_positions} positions; lower max_new_tokens."
            )

    def _shared_prefill_expand_size(self, kwargs: dict[str, Any]) -> int:
        """How many copies of each image's sequence ``generate`` will decode (beams or returned sequences).

        Returns 1 (no shared prefill) whenever the caller controls the cache or asks for per-position outputs
        that a shared prefill would not produce (hidden states / attentions of the prompt positions).
        """
        config = kwargs.get("generation_config") or self.generation_config
        if any(
            kwargs.get(k) is not None
            for k in ("cache", "past_key_values", "assistant_model", "custom_generate")
        ):
            return 1
        for name in ("cache_implementation", "prefill_chunk_size", "prompt_lookup_num_tokens"):
            if kwargs.get(name, getattr(config, name, None)) is not None:
                return 1
        for name in ("output_hidden_states", "output_attentions"):
            if kwargs.get(name, getattr(config, name, False)):
                return 1
        num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        num_return = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
        return max(int(num_beams), int(num_return))

    def _prefill_shared_prefix(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, expand_size: int
    ) -> Any:
        """Run GPT-2 once per image over all but the last position of ``[prefix ; prompt]`` and copy the cache.

        Args:
            inputs_embeds: (B, S, E) left-padded ``[pad ; prefix ; prompt]`` embeddings.
            attention_mask: (B, S) their mask.
            expand_size: number of beams / returned sequences per image.

        Returns:
            A ``DynamicCache`` of S - 1 positions for B * expand_size rows (each image's rows adjacent, as
            ``generate`` expands its inputs). ``generate`` then sees the cache and feeds only the last
            position of each row (with the output layer on it alone); positions and masking match what
            ``generate`` would have computed itself (positions from the mask's cumulative sum).
        """
        prefill_mask = attention_mask[:, :-1]
        position_ids = (prefill_mask.cumsum(-1) - 1).clamp_min(0)
        outputs = self.language_model.transformer(
            inputs_embeds=inputs_embeds[:, :-1],
            attention_mask=None if bool(prefill_mask.all()) else prefill_mask,
            position_ids=position_ids,
            use_cache=True,
        )
        cache = output_cache(outputs)
        cache.batch_repeat_interleave(expand_size)
        return cache

    #: Replace the stock minimum-length processors by the in-place ``EosSuppressionUntilLength`` (same scores,
    #: no full-vocabulary temporaries). Set to False on an instance to get the stock processors back.
    fast_eos_suppression: bool = True

    def _get_logits_processor(self, generation_config: Any, *args: Any, **kwargs: Any) -> LogitsProcessorList:
        # Private GenerationMixin hook (see compat.py): if a release drops it, generate stops calling this
        # override and the stock processors run (same scores, slower).
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if not self.fast_eos_suppression or getattr(generation_config, "output_logits", False):
            return processors  # raw logits are returned: the stock processors never write into them
        return swap_min_length_processors(processors)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor | Any:
        """Caption images with any ``transformers`` decoding strategy (greedy, beam search, sampling...).

        Args:
            pixel_values: (B, 3, H, W) processed images, or
            image_embeds: (B, D) precomputed image embeddings.
            input_ids: optional text prompt (B, L) the caption continues (left-padded for a batch).
            attention_mask: (B, L) mask of the prompt.
            **generate_kwargs: anything ``GenerationMixin.generate`` takes (``num_beams``, ``max_new_tokens``,
                ``do_sample``, ``top_k``, ``top_p``, ``temperature``, ``num_return_sequences``, ...).

        Returns:
            Token ids (B * num_return_sequences, T). Without a prompt only the generated tokens; with a prompt
            the prompt followed by the generated tokens (the decoder-only convention). The KV cache is always on.
        """
        if pixel_values is None and image_embeds is None and "inputs_embeds" in generate_kwargs:
            # Plain decoder-only use: GPT-2 continuing given embeddings.
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        self._validate_generation_kwargs(generate_kwargs)
        if generate_kwargs.get("use_cache") is False:
            raise ValueError("ClipCap generation always uses the KV cache; drop `use_cache=False`.")
        prefix, _ = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds)
        inputs_embeds, full_mask = self._build_prompt_embeds(prefix, input_ids, attention_mask)
        if input_ids is not None and attention_mask is not None and bool((attention_mask == 0).any()):
            # keep returned prompt ids aligned with their (left-padded) rows
            order = torch.sort(attention_mask.to(torch.long), dim=1, stable=True).indices
            input_ids = torch.gather(input_ids, 1, order)
        expand_size = self._shared_prefill_expand_size(generate_kwargs)
        if expand_size > 1 and inputs_embeds.shape[1] > 1:
            # Beams / returned sequences of one image share [prefix ; prompt]: run it once per image.
            generate_kwargs[CACHE_KWARG] = self._prefill_shared_prefix(inputs_embeds, full_mask, expand_size)
        return super().generate(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=full_mask,
            **generate_kwargs,
        )

    # ------------------------------------------------------------------ interpretability

    @torch.no_grad()
    def interpret_prefix(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        tokenizer: Any = None,
        top_k: int = 1,
    ) -> list[list[Any]]:
        """Nearest GPT-2 vocabulary tokens (cosine similarity) of each prefix vector (paper, section 4.7).

        Returns one list of K entries per image. Each entry is a token string (with a tokenizer) or a token
        id (without); with ``top_k > 1`` each entry is a list of the ``top_k`` nearest, best first.
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
        prefix, _ = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds)  # (B, K, E)
        vocab = self.language_model.transformer.wte.weight  # (V, E)
        sims = F.normalize(prefix.float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).T  # (B, K, V)
        top = sims.topk(min(top_k, vocab.shape[0]), dim=-1).indices.tolist()  # (B, K, top_k)

        def render(token_id: int) -> Any:
            if tokenizer is None:
                return token_id
            return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)

        result = []
        for image in top:
            entries = []
            for ids in image:
                entries.append(render(ids[0]) if top_k == 1 else [render(i) for i in ids])
            result.append(entries)
        return result

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str | None,
        text_model_name_or_path: str,
        **config_kwargs: Any,
    ) -> ClipCapForConditionalGeneration:
        """Build a ClipCap model around pretrained CLIP and GPT-2 weights; the mapping network is new.

        Args:
            vision_model_name_or_path: a full CLIP checkpoint (``CLIPModel``) or a CLIP vision checkpoint
                (``CLIPVisionModelWithProjection``); ``None`` for an embeddings-only model (then pass
                ``image_embed_dim``).
            text_model_name_or_path: a GPT-2 checkpoint.
            **config_kwargs: ClipCap fields (``mapping_type``, ``prefix_length``, ...) and ``from_pretrained``
                options (``dtype``, ``revision``, ``cache_dir``, ``local_files_only``, ``token``).
        """
        load_keys = (
            "revision",
            "cache_dir",
            "local_files_only",
            "token",
            "trust_remote_code",
            "dtype",
            "torch_dtype",
        )
        load_kwargs = {k: config_kwargs.pop(k) for k in load_keys if k in config_kwargs}
        vision = None
        if vision_model_name_or_path is not None:
            vision_config = AutoConfig.from_pretrained(
                vision_model_name_or_path,
                **{k: v for k, v in load_kwargs.items() if k not in ("dtype", "torch_dtype")},
            )
            if getattr(vision_config, "vision_config", None) is not None:
                # A full CLIP checkpoint: its projection width lives on the top-level config.
                projection_dim = vision_config.projection_dim
                vision_config = vision_config.vision_config
                vision_config.projection_dim = projection_dim
                # Its text tower's weights are expected leftovers: don't print them as "UNEXPECTED".
                verbosity = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
            else:
                verbosity = None
            try:
                vision, loading_info = CLIPVisionModelWithProjection.from_pretrained(
                    vision_model_name_or_path, config=vision_config, output_loading_info=True, **load_kwargs
                )
            finally:
                if verbosity is not None:
                    hf_logging.set_verbosity(verbosity)
            missing = sorted(loading_info.get("missing_keys") or [])
            if "visual_projection.weight" in missing:
                raise ValueError(
                    f"{vision_model_name_or_path} has no visual projection (visual_projection.weight); ClipCap "
                    "needs CLIP's projected image_embeds: give a full CLIP or a CLIPVisionModelWithProjection checkpoint."
                )
            if missing:
                raise ValueError(
                    f"{vision_model_name_or_path} lacks CLIP vision weights {missing[:5]} ({len(missing)} missing); "
                    "give a CLIP or CLIP-vision checkpoint."
                )
            if vision.visual_projection is None:
                raise ValueError(
                    f"{vision_model_name_or_path} has no visual projection; ClipCap needs CLIP's image_embeds."
                )
        text = GPT2LMHeadModel.from_pretrained(text_model_name_or_path, **load_kwargs)
        config = ClipCapConfig(
            vision_config=vision.config if vision is not None else None,
            text_config=text.config,
            **config_kwargs,
        )
        model = cls(config)
        if vision is not None:
            model.vision_model.load_state_dict(vision.state_dict())
        model.language_model.load_state_dict(text.state_dict())
        model.language_model.tie_weights()
        dtype = load_kwargs.get("dtype", load_kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        model._apply_freezing()
        return model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained`` that also lists every Auto class in ``config.auto_map``."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoConfig", "configuration_clipcap.ClipCapConfig")
            for auto_class in ("AutoModel", "AutoModelForImageTextToText"):
                auto_map.setdefault(auto_class, "modeling_clipcap.ClipCapForConditionalGeneration")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (or trainable ones) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ClipCapForConditionalGeneration",
    "ClipCapMLPMapper",
    "ClipCapOutput",
    "ClipCapPreTrainedModel",
    "ClipCapTransformerMapper",
    "count_parameters",
]
