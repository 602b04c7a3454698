"""ClipCap: prefix captioning (an image tower, a mapping network, a causal LM) on transformers building blocks.

Data flow (B images, K = ``prefix_length``, D = ``image_embed_dim``, E = the LM's width, L = caption tokens)::

    pixel_values (B, 3, H, W) -> image tower -> image_embeds (B, D) or token features (B, N, D) } ClipCapModel
    image_embeds -> [optional per-vector L2 norm] -> mapping network -> prefix (B, K, E)        } (the base)
    [prefix ; embed(input_ids)] (B, K + L, E) -> causal LM -> logits (B, K + L, V)

The tower (CLIP by default) and the LM (GPT-2 by default) are unmodified transformers models built through the
Auto classes (``towers.py`` says what is read from each family); this file adds the paper's two mapping
networks and wires generation through ``GenerationMixin`` with ``inputs_embeds``.
"""

from __future__ import annotations

from .compat import (  # checks the transformers release first
    CACHE_KWARG,
    cache_kwargs,
    output_cache,
    pop_cache_argument,
    register_key_renames,
    slice_logits_to_keep,
)

# isort: split
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.logits_process import LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast, ModelOutput

from .configuration_clipcap import ClipCapConfig
from .fast_decoding import (
    blocked_output_layer,
    prefill_shared_prefix,
    shared_prefill_expand_size,
    swap_min_length_processors,
)
from .towers import (
    build_language_model,
    build_vision_tower,
    check_language_config,
    has_fast_paths,
    image_features,
    load_pretrained_tower,
    tower_dtype,
)
from .validation import check_generation_kwargs, check_image_inputs

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
    (B, K, E). With ``mapping_input="tokens"`` the tower's features (B, N, D) -> Linear(D, E) -> (B, N, E)
    take the place of the clip_length projected vectors.
    """

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        e = config.hidden_size
        self.tokens = config.mapping_input == "tokens"
        self.clip_length = config.clip_length
        self.hidden_size = e
        self.linear = nn.Linear(config.image_embed_dim, e if self.tokens else config.clip_length * e)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, e))
        self.layers = nn.ModuleList(
            ClipCapMapperLayer(e, config.mapping_num_heads, config.mapping_mlp_ratio)
            for _ in range(config.mapping_num_layers)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D), or (B, N, D) token features -> (B, K, E)."""
        b = image_embeds.shape[0]
        clip_tokens = self.linear(image_embeds)  # (B, N, E) for tokens
        if not self.tokens:
            clip_tokens = clip_tokens.view(b, self.clip_length, self.hidden_size)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(clip_tokens.dtype)
        hidden_states = torch.cat([clip_tokens, const], dim=1)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states[:, clip_tokens.shape[1] :]


MAPPING_NETWORKS: dict[str, type[nn.Module]] = {
    "mlp": ClipCapMLPMapper,
    "transformer": ClipCapTransformerMapper,
}

#: Checkpoints keep the layout of release 0.1.0 (no base model): these renames map it onto today's modules on
#: load, and ``save_pretrained`` writes it back (transformers' ``save_original_format``).
LEGACY_KEY_RENAMES = {
    r"^vision_model\.": "model.vision_model.",
    r"^mapping_network\.": "model.mapping_network.",
}
_RENAMES_REGISTERED = register_key_renames("ClipCapForConditionalGeneration", LEGACY_KEY_RENAMES)

#: Extra image inputs some towers take next to ``pixel_values`` (SigLIP2's NaFlex patches).
_TOWER_INPUTS = ("pixel_attention_mask", "spatial_shapes")


@dataclass
class ClipCapOutput(CausalLMOutputWithPast):
    """Output of [`ClipCapForConditionalGeneration.forward`]: transformers' causal-LM output plus the prefix.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): caption cross-entropy (with ``labels``).
        logits (`torch.FloatTensor` of shape `(B, S, V)`): language-model logits, S = K + L positions with an image
            (or the positions ``logits_to_keep`` selects).
        cache (`Cache`, *optional*): the language model's key/value cache, ``past_key_values`` under transformers < 5.24.
        prefix_embeds (`torch.FloatTensor` of shape `(B, K, E)`, *optional*): the mapped prefix.
        image_embeds (`torch.FloatTensor` of shape `(B, D)` or `(B, N, D)`, *optional*): what the mapper read.
    """

    prefix_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


@dataclass
class ClipCapModelOutput(ModelOutput):
    """Output of [`ClipCapModel.forward`]: prefix (B, K, E) and the image embedding (B, D) it came from."""

    prefix_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


class ClipCapPreTrainedModel(PreTrainedModel):
    """Weight initialisation, attention back-ends and checkpointing shared by ClipCap models."""

    config: ClipCapConfig
    config_class = ClipCapConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"  # a text prompt; images enter as pixel_values / image_embeds keywords
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block", "CLIPEncoderLayer", "ClipCapMapperLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats models defined outside it as "custom code" and, when initialising weights missing from
        # a checkpoint, then skips every module without parameters of its own: CLIP's MLP / attention blocks, whose
        # init rules would never run. Our init uses transformers.initialization (it respects loaded weights), so
        # the safeguard is not needed: missing weights get the init from_config gives. Keys are renamed on load
        # through the mapping registered by class name, which does not depend on this flag.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The tower and the LM are PreTrainedModels: transformers hands their modules to their own _init_weights.
        if isinstance(module, ClipCapTransformerMapper):
            init.normal_(module.prefix_const, mean=0.0, std=1.0)  # torch.randn, as in the paper's code
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class ClipCapModel(ClipCapPreTrainedModel):
    """The base model: images -> LM prefix. ``vision_model`` (the image tower, absent for an embeddings-only
    config) and ``mapping_network`` (`ClipCapMLPMapper` or `ClipCapTransformerMapper`)."""

    def __init__(self, config: ClipCapConfig):
        super().__init__(config)
        vision = config.vision_config
        self.vision_model = build_vision_tower(vision) if vision is not None else None
        self.mapping_network = MAPPING_NETWORKS[config.mapping_type](config)
        self.post_init()

    def check_image_inputs(
        self, pixel_values: torch.Tensor | None, image_embeds: torch.Tensor | None
    ) -> None:
        """Validate the image input (exactly one of the two, right type, shape, finite) before any work."""
        check_image_inputs(self.config, self.vision_model is not None, pixel_values, image_embeds)

    def get_image_features(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling | tuple:
        """The image tower on ``pixel_values`` (B, 3, H, W): ``pooler_output`` is the image embedding (B, D) of the
        tower's family (CLIP: the projected embedding, ``encode_image``; see ``towers.VISION_FAMILIES``),
        ``last_hidden_state`` the token features (B, N, D_tokens) (a CNN's map flattened) and, when asked
        (``output_hidden_states``, ``output_attentions``), the tower's hidden states and attentions. A tuple with
        ``return_dict=False``. SigLIP2 also takes ``pixel_attention_mask`` and ``spatial_shapes``."""
        if self.vision_model is None:
            raise ValueError("This ClipCap model has no vision tower; it takes `image_embeds` directly.")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            features = image_features(
                self.vision_model,
                self.config.vision_config,
                pixel_values.to(tower_dtype(self.vision_model)),
                **kwargs,
            )
        return features if return_dict is not False else features.to_tuple()

    def get_prefix(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **image_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D), (B, N, D) with
        ``mapping_input="tokens"``) -> ``(prefix (B, K, E), image_embeds)``."""
        self.check_image_inputs(pixel_values, image_embeds)
        if image_embeds is None:
            features = self.get_image_features(pixel_values, **image_kwargs)
            tokens = self.config.mapping_input == "tokens"
            image_embeds = features.last_hidden_state if tokens else features.pooler_output
        embeds = image_embeds.to(next(self.mapping_network.parameters()).dtype)
        if self.config.normalize_prefix:
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
        return self.mapping_network(embeds), image_embeds

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ClipCapModelOutput:
        """Images -> [`ClipCapModelOutput`] with ``prefix_embeds`` (B, K, E) and ``image_embeds`` (B, D)."""
        prefix, image_embeds = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds, **kwargs)
        return ClipCapModelOutput(prefix_embeds=prefix, image_embeds=image_embeds)


class ClipCapForConditionalGeneration(ClipCapPreTrainedModel, GenerationMixin):
    """ClipCap: ``model`` ([`ClipCapModel`], images -> prefix) and ``language_model`` (a causal LM, GPT-2 by default).

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

    #: CPU speed paths (``fast_decoding.py``): in-place EOS suppression, the output layer in blocks of this
    #: many vocabulary rows (None: one call), one prefill shared by the beams of an image. Set on an instance to
    #: compare with the stock paths. The last two need a language model of ``towers.FAST_PATH_LANGUAGE_FAMILIES``.
    fast_eos_suppression: bool = True
    cpu_output_layer_block: int | None = 1024
    shared_prefill: bool = True

    def __init__(self, config: ClipCapConfig):
        super().__init__(config)
        self.model = ClipCapModel(config)
        self.language_model = build_language_model(config.text_config)  # ties its own embeddings
        parts = [self.language_model, self.model.vision_model]
        self._no_split_modules = sorted(
            {"ClipCapMapperLayer"}.union(*(p._no_split_modules or [] for p in parts if p is not None))
        )
        self.post_init()
        self._apply_freezing()

    # The base model's parts under their 0.1.0 names (train.py, convert_original.py and the benchmarks use them).
    vision_model = property(
        lambda self: self.model.vision_model, lambda self, v: setattr(self.model, "vision_model", v)
    )
    mapping_network = property(lambda self: self.model.mapping_network)

    def _apply_freezing(self) -> None:
        if self.vision_model is not None and self.config.freeze_vision:
            self.vision_model.requires_grad_(False).eval()
        if self.config.freeze_language_model:
            self.language_model.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` that reads 0.1.0 checkpoints and re-applies the config's freezing."""
        if not _RENAMES_REGISTERED and "key_mapping" not in kwargs:
            kwargs["key_mapping"] = LEGACY_KEY_RENAMES
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._apply_freezing()
        return loaded

    def train(self, mode: bool = True) -> ClipCapForConditionalGeneration:
        """Like ``nn.Module.train`` but frozen sub-models stay in eval mode (no dropout)."""
        super().train(mode)
        self._apply_freezing() if mode else None
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Deprecated: ``[p for p in model.parameters() if p.requires_grad]`` (kept for training/train.py)."""
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_parameter_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Deprecated alias of ``training_utils.optimizer_parameter_groups(model, weight_decay)``."""
        from .training_utils import optimizer_parameter_groups

        return optimizer_parameter_groups(self, weight_decay)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.base_model

    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Any
    ) -> BaseModelOutputWithPooling | tuple:
        """See [`ClipCapModel.get_image_features`]: ``.pooler_output`` is the (B, D) image embedding."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_prefix(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **image_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix (B, K, E) in the LM's dtype, image_embeds)``; see [`ClipCapModel.get_prefix`]."""
        prefix, image_embeds = self.model.get_prefix(
            pixel_values=pixel_values, image_embeds=image_embeds, **image_kwargs
        )
        return prefix.to(self.get_input_embeddings().weight.dtype), image_embeds

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
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ClipCapOutput | tuple:
        r"""Caption likelihood of images, or one decoding step.

        With an image (``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D)) the sequence is ``[prefix (K) ;
        text (L)]``, the text given as ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, E). ``attention_mask``,
        ``position_ids`` (positions of the text: 0 is its first token) and ``labels`` (-100 ignored) cover the
        text only: prefix positions are always attended, never in the loss, and the first caption token is
        predicted from the last prefix position. Left padding gives the padded rows the positions they would
        have unpadded. ``shift_labels`` (B, L) (the target of each text position), ``num_items_in_batch`` and
        ``ignore_index`` reach ``self.loss_function`` as in every transformers causal LM.

        Without an image, ``input_ids`` or ``inputs_embeds`` go straight to the LM (the decoding steps of
        ``generate``); ``attention_mask`` and ``position_ids`` then cover the whole sequence.

        ``cache`` is the LM's key/value cache (``past_key_values`` is accepted too). Returns a [`ClipCapOutput`]
        with ``logits`` (B, K + L, V) (or the ``logits_to_keep`` positions), or its tuple with ``return_dict=False``.
        """
        cache = pop_cache_argument(cache, kwargs)
        loss_kwargs = {
            k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs
        }
        image_kwargs = {k: kwargs.pop(k) for k in _TOWER_INPUTS if k in kwargs}
        prefix = None
        k = 0
        if pixel_values is not None or image_embeds is not None:
            prefix, image_embeds = self.get_prefix(
                pixel_values=pixel_values, image_embeds=image_embeds, **image_kwargs
            )
            batch, k = prefix.shape[:2]
            inputs_embeds, attention_mask, position_ids = self._join_prefix(
                prefix, input_ids, inputs_embeds, attention_mask, position_ids
            )
            input_ids = None
            text_shape = (batch, inputs_embeds.shape[1] - k)
            for name, value in (("labels", labels), ("shift_labels", loss_kwargs.get("shift_labels"))):
                if value is not None and tuple(value.shape) != text_shape:
                    raise ValueError(
                        f"`{name}` must have the shape of the text {text_shape}; -100 marks ignored positions."
                    )
        elif labels is not None or "shift_labels" in loss_kwargs:
            raise ValueError("`labels` need an image: pass `pixel_values` or `image_embeds` with them.")

        lm_inputs = dict(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **cache_kwargs(cache),
            **kwargs,
        )
        with_loss = labels is not None or "shift_labels" in loss_kwargs
        if has_fast_paths(
            self.config.text_config
        ):  # the LM's body, then its plain output layer (blocked on CPU)
            outputs = self.get_decoder()(**lm_inputs)
            hidden_states = outputs.last_hidden_state  # (B, K + L, E)
            logits = self._output_layer(slice_logits_to_keep(hidden_states, logits_to_keep))  # (B, S, V)
            head = self.get_output_embeddings()
            text_logits = lambda window: head(hidden_states[:, window])  # noqa: E731
        else:  # the LM's own forward: soft-capping, logit scaling... stay its own
            outputs = self.language_model(**lm_inputs, logits_to_keep=0 if with_loss else logits_to_keep)
            all_logits = outputs.logits
            logits = slice_logits_to_keep(all_logits, logits_to_keep) if with_loss else all_logits
            text_logits = lambda window: all_logits[:, window]  # noqa: E731
        loss = None
        if with_loss:
            loss = self._caption_loss(text_logits, k, labels, **loss_kwargs)
        result = ClipCapOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            prefix_embeds=prefix,
            image_embeds=image_embeds,
            **cache_kwargs(output_cache(outputs)),
        )
        return (
            result
            if (return_dict if return_dict is not None else self.config.return_dict)
            else result.to_tuple()
        )

    def _join_prefix(
        self,
        prefix: torch.Tensor,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
        """``[prefix ; text]`` embeddings (B, K + L, E), mask (B, K + L) and positions (B, K + L).

        Without ``position_ids``, a left-padded row gets the positions of the same row unpadded (right padding
        keeps GPT-2's 0, 1, 2...); given text ``position_ids`` (B, L) are shifted by K.
        """
        batch, k = prefix.shape[:2]
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("Pass the text as `input_ids` or as `inputs_embeds`, not both.")
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.shape[0] != batch:
                raise ValueError(
                    f"`input_ids` must have shape ({batch}, L) to match {batch} images, got {tuple(input_ids.shape)}."
                )
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != batch):
            raise ValueError(
                f"`inputs_embeds` must have shape ({batch}, L, E), got {tuple(inputs_embeds.shape)}."
            )
        text_length = 0 if inputs_embeds is None else inputs_embeds.shape[1]
        embeds = (
            prefix if inputs_embeds is None else torch.cat([prefix, inputs_embeds.to(prefix.dtype)], dim=1)
        )
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None and tuple(value.shape) != (batch, text_length):
                raise ValueError(
                    f"`{name}` must have the shape of the text (B, L) = ({batch}, {text_length})."
                )
        ones = torch.ones((batch, k), dtype=torch.long, device=prefix.device)
        if position_ids is not None:
            position_ids = torch.cat([ones.cumsum(-1) - 1, position_ids.to(prefix.device) + k], dim=1)
        if attention_mask is not None:
            if position_ids is None:  # left padding shifts a row's text back by its number of leading pads
                leading = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1)
                steps = torch.arange(k + text_length, device=prefix.device).expand(batch, -1)
                position_ids = torch.where(steps < k, steps, (steps - leading).clamp_min(0))
            attention_mask = torch.cat([ones.to(attention_mask.dtype), attention_mask], dim=1)
        return embeds, attention_mask, position_ids

    def _caption_loss(
        self,
        text_logits: Any,
        k: int,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ) -> torch.Tensor:
        """``self.loss_function`` on the positions that predict text: K-1 .. K+L-2 for ``labels`` (B, L), whose
        token i comes after position K-1+i; K .. K+L-1 for ``shift_labels`` (B, L), already one step ahead.
        ``text_logits(window)`` gives the logits (B, L, V) of a slice of positions."""
        start = k - 1 if shift_labels is None else k
        targets = labels if shift_labels is None else shift_labels
        return self.loss_function(
            logits=text_logits(slice(start, start + targets.shape[1])),
            labels=None,
            vocab_size=self.config.text_config.vocab_size,
            shift_labels=targets,
            **loss_kwargs,
        )

    def _output_layer(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM's output layer (..., E) -> (..., V); in vocabulary blocks when decoding on CPU."""
        return blocked_output_layer(self.get_output_embeddings(), hidden_states, self.cpu_output_layer_block)

    # ------------------------------------------------------------------ generation

    def _build_prompt_embeds(
        self, prefix: torch.Tensor, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prefix ; prompt]`` embeddings (B, K + L, E) and mask (B, K + L), rows reordered to read
        ``[pad ... pad, prefix, prompt]`` (a left-padded prompt would leave its padding after the prefix)."""
        embeds, mask, _ = self._join_prefix(prefix, input_ids, None, attention_mask, None)
        mask = (
            torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            if mask is None
            else mask.long()
        )
        if bool((mask == 0).any()):
            order = torch.sort(mask, dim=1, stable=True).indices  # pads (0) first, order kept otherwise
            embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds))
            mask = torch.gather(mask, 1, order)
        return embeds, mask

    def _shared_prefill_expand_size(self, kwargs: dict[str, Any]) -> int:
        return shared_prefill_expand_size(self.generation_config, kwargs)

    def _shares_prefill(self) -> bool:
        """Shared prefill needs the LM's body to fill a plain ``DynamicCache`` (``towers.has_fast_paths``)."""
        return self.shared_prefill and has_fast_paths(self.config.text_config)

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
        inputs: torch.LongTensor | None = None,
        *,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor | Any:
        """Caption images with any ``transformers`` decoding strategy (greedy, beam search, sampling...).

        Args:
            inputs / input_ids: optional text prompt (B, L) the caption continues (left-padded for a batch).
            pixel_values: (B, 3, H, W) processed images (SigLIP2: with ``pixel_attention_mask``, ``spatial_shapes``), or
            image_embeds: (B, D) (or (B, N, D) with ``mapping_input="tokens"``) precomputed image embeddings.
            attention_mask: (B, L) mask of the prompt.
            **generate_kwargs: anything ``GenerationMixin.generate`` takes (``num_beams``, ``max_new_tokens``,
                ``do_sample``, ``return_dict_in_generate``, ``past_key_values`` / ``cache`` to continue...).
                Assisted decoding is refused; ``use_cache=False`` decodes as with the cache (same tokens), as
                transformers does for any generation from embeddings.

        Returns:
            Token ids (B * num_return_sequences, T): without a prompt only the generated tokens; with a prompt the
            prompt followed by them (the decoder-only convention). Or a ``GenerateOutput`` when asked.
        """
        check_generation_kwargs(self.config, self.generation_config, inputs, generate_kwargs)
        if inputs is not None and input_ids is not None:
            raise ValueError("Pass the prompt once: as `inputs` or as `input_ids`.")
        input_ids = inputs if input_ids is None else input_ids
        if pixel_values is None and image_embeds is None and "inputs_embeds" in generate_kwargs:
            # Plain decoder-only use: the LM continuing given embeddings.
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        cache = pop_cache_argument(generate_kwargs.pop("cache", None), generate_kwargs)
        image_kwargs = {k: generate_kwargs.pop(k) for k in _TOWER_INPUTS if k in generate_kwargs}
        prefix, _ = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds, **image_kwargs)
        inputs_embeds, full_mask = self._build_prompt_embeds(prefix, input_ids, attention_mask)
        if input_ids is not None and attention_mask is not None and bool((attention_mask == 0).any()):
            # keep returned prompt ids aligned with their (left-padded) rows
            input_ids = torch.gather(
                input_ids, 1, torch.sort(attention_mask.long(), dim=1, stable=True).indices
            )
        expand_size = self._shared_prefill_expand_size({**generate_kwargs, "cache": cache})
        if expand_size > 1 and inputs_embeds.shape[1] > 1 and self._shares_prefill():
            # Beams / returned sequences of one image share [prefix ; prompt]: run it once per image.
            cache = prefill_shared_prefix(self.get_decoder(), inputs_embeds, full_mask, expand_size)
        if cache is not None:
            generate_kwargs[CACHE_KWARG] = cache
        return super().generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=full_mask, **generate_kwargs
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
        """Nearest language-model vocabulary tokens (cosine similarity) of each prefix vector (paper, section 4.7).

        Returns one list of K entries per image. Each entry is a token string (with a tokenizer) or a token
        id (without); with ``top_k > 1`` each entry is a list of the ``top_k`` nearest, best first.
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
        prefix, _ = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds)  # (B, K, E)
        vocab = self.get_input_embeddings().weight  # (V, E)
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
        """Build a ClipCap model around a pretrained image tower and causal LM; the mapping network is new.

        Args:
            vision_model_name_or_path: a checkpoint of a supported image tower (``towers.VISION_FAMILIES``), or a
                full CLIP / SigLIP / SigLIP2 checkpoint (its vision tower is taken); ``None`` for an
                embeddings-only model (then pass ``image_embed_dim``).
            text_model_name_or_path: a decoder-only causal LM checkpoint (GPT-2, Llama, Qwen, OPT, Pythia, Gemma...).
            **config_kwargs: ClipCap fields (``mapping_type``, ``mapping_input``, ``prefix_length``, ...) and
                ``from_pretrained`` options (``dtype``, ``revision``, ``cache_dir``, ``local_files_only``, ``token``).

        The matching processor: ``ClipCapProcessor.from_vision_text_pretrained(vision_path, text_path)``.
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
        config_load_kwargs = {k: v for k, v in load_kwargs.items() if k not in ("dtype", "torch_dtype")}
        vision = None
        if vision_model_name_or_path is not None:
            vision = load_pretrained_tower(vision_model_name_or_path, **load_kwargs)
        check_language_config(AutoConfig.from_pretrained(text_model_name_or_path, **config_load_kwargs))
        text = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, **load_kwargs)
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


__all__ = [
    "ClipCapForConditionalGeneration",
    "ClipCapMLPMapper",
    "ClipCapModel",
    "ClipCapOutput",
    "ClipCapPreTrainedModel",
    "ClipCapTransformerMapper",
]
