"""ClipCap: prefix captioning (an image tower, a mapping network, a causal LM) on transformers building blocks.

Data flow (B images, K = ``prefix_length``, D = ``image_embed_dim``, E = the LM's width, L = caption tokens)::

    pixel_values (B, 3, H, W) -> image tower -> image_embeds (B, D) or token features (B, N, D) } ClipCapModel
    image_embeds -> [optional per-vector L2 norm] -> mapping network -> prefix (B, K, E)        } (the base)
    [prefix ; embed(input_ids)] (B, K + L, E) -> causal LM -> logits (B, K + L, V)

``get_image_embeddings`` gives the first line's output (the tower's), ``get_image_features`` the second's (the
prefix as ``pooler_output``, transformers 5.x's convention), ``get_prefix`` both tensors.
The tower (CLIP by default) and the LM (GPT-2 by default) are unmodified transformers models built through the
Auto classes (``towers.py`` says what is read from each family); the paper's two mapping networks are in
``mapping_networks.py``. This file wires them together and generation through ``GenerationMixin`` with
``inputs_embeds``; the CPU decoding speed paths come from ``fast_decoding.py``.
"""

from __future__ import annotations

# compat checks the transformers release first
from .compat import CACHE_KWARG, cache_kwargs, output_cache, pop_cache_argument, register_key_renames

# isort: split
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast, ModelOutput
from transformers.utils import can_return_tuple

from .configuration_clipcap import ClipCapConfig
from .fast_decoding import FastDecodingMixin
from .interpretation import nearest_tokens
from .mapping_networks import MAPPING_NETWORKS, ClipCapMLPMapper, ClipCapTransformerMapper
from .prefix_sequence import PrefixDecoding, generation_sequence, join_prefix
from .towers import (
    build_language_model,
    build_vision_tower,
    check_language_config,
    image_features,
    load_pretrained_tower,
    tower_dtype,
)
from .training_utils import FrozenPartsTrainingMixin
from .validation import check_generation_kwargs, check_image_inputs, check_prompt_inputs, check_text_inputs

#: Checkpoints keep the layout of release 0.1.0 (no base model): these renames map it onto today's modules on
#: load, and ``save_pretrained`` writes it back (transformers' ``save_original_format``).
LEGACY_KEY_RENAMES = {
    r"^vision_model\.": "model.vision_model.",
    r"^mapping_network\.": "model.mapping_network.",
}
_RENAMES_REGISTERED = register_key_renames("ClipCapForConditionalGeneration", LEGACY_KEY_RENAMES)

#: Extra image inputs some towers take next to ``pixel_values`` (SigLIP2's NaFlex patches).
_TOWER_INPUTS = ("pixel_attention_mask", "spatial_shapes")
#: ``from_pretrained`` options ``from_vision_text_pretrained`` passes on to both parts.
_LOAD_KEYS = (
    "revision",
    "cache_dir",
    "local_files_only",
    "token",
    "trust_remote_code",
    "dtype",
    "torch_dtype",
)


@dataclass
class ClipCapOutput(CausalLMOutputWithPast):
    """Output of [`ClipCapForConditionalGeneration.forward`]: transformers' causal-LM output plus the prefix.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): caption cross-entropy (with ``labels``).
        logits (`torch.FloatTensor` of shape `(B, S, V)`): language-model logits, S = K + L positions with an image
            (or the positions ``logits_to_keep`` selects).
        cache (`Cache`, *optional*): the language model's key/value cache, ``past_key_values`` under transformers < 5.24.
        hidden_states, attentions (*optional*): the language model's, over the K + L positions.
        prefix_embeds (`torch.FloatTensor` of shape `(B, K, E)`, *optional*): the mapped prefix.
        image_embeds (`torch.FloatTensor` of shape `(B, D)` or `(B, N, D)`, *optional*): what the mapper read.
        image_outputs (`BaseModelOutputWithPooling`, *optional*): the image tower's outputs when ``pixel_values``
            were given (``None`` with ``image_embeds``): ``pooler_output`` (B, D), ``last_hidden_state``
            (B, N, D_tokens), and its ``hidden_states`` / ``attentions`` with ``output_hidden_states`` /
            ``output_attentions``.
    """

    prefix_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class ClipCapModelOutput(ModelOutput):
    """Output of [`ClipCapModel.forward`]: prefix (B, K, E), the image embedding (B, D) it came from and the
    tower's outputs (``None`` when ``image_embeds`` were given)."""

    prefix_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


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
        # For "custom code" transformers skips initialising parameter-less modules (CLIP's MLP / attention blocks)
        # when filling weights missing from a checkpoint. Our init uses transformers.initialization, which respects
        # loaded weights, so missing weights get the init from_config gives.
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

    @can_return_tuple
    def get_image_embeddings(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """The image tower alone, on ``pixel_values`` (B, 3, H, W): what ``image_embeds=`` takes.

        Returns a ``BaseModelOutputWithPooling`` (a tuple with ``return_dict=False`` or ``config.return_dict=False``):
        ``pooler_output`` is the image embedding (B, D) of the tower's family (CLIP: the projected embedding;
        ``towers.VISION_FAMILIES``), ``last_hidden_state`` the token features (B, N, D_tokens); the one
        ``config.mapping_input`` names is what the mapper reads (and what the embedding cache stores).
        ``hidden_states`` / ``attentions``: the tower's, with ``output_hidden_states`` / ``output_attentions``.
        SigLIP2 also takes ``pixel_attention_mask`` and ``spatial_shapes``.
        """
        if self.vision_model is None:
            raise ValueError("This ClipCap model has no vision tower; it takes `image_embeds` directly.")
        pixel_values = pixel_values.to(tower_dtype(self.vision_model))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            return image_features(self.vision_model, self.config.vision_config, pixel_values, **kwargs)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Images as the language model consumes them (transformers 5.x): ``pooler_output`` is the prefix
        (B, K, E); ``last_hidden_state`` (B, N, D_tokens), ``hidden_states`` and ``attentions`` are the tower's.

        ``pixel_values`` (B, 3, H, W); ``kwargs``: ``output_hidden_states``, ``output_attentions``, SigLIP2's
        ``pixel_attention_mask`` / ``spatial_shapes``. A tuple with ``return_dict=False`` (or
        ``config.return_dict=False``). The image embedding (B, D) itself: [`~ClipCapModel.get_image_embeddings`].
        """
        prefix, _, tower = self.encode_images(pixel_values=pixel_values, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=prefix,
            hidden_states=tower.hidden_states,
            attentions=tower.attentions,
        )

    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **image_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutputWithPooling | None]:
        """Images (``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D), (B, N, D) with
        ``mapping_input="tokens"``) -> ``(prefix (B, K, E), image_embeds, tower outputs or None)``."""
        check_image_inputs(self.config, self.vision_model is not None, pixel_values, image_embeds)
        tower = None
        if image_embeds is None:
            tower = self.get_image_embeddings(pixel_values, return_dict=True, **image_kwargs)
            tokens = self.config.mapping_input == "tokens"
            image_embeds = tower.last_hidden_state if tokens else tower.pooler_output
        embeds = image_embeds.to(next(self.mapping_network.parameters()).dtype)
        if self.config.normalize_prefix:
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
        return self.mapping_network(embeds), image_embeds, tower

    def get_prefix(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **image_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D), (B, N, D) with
        ``mapping_input="tokens"``) -> ``(prefix (B, K, E), image_embeds)``."""
        prefix, image_embeds, _ = self.encode_images(pixel_values, image_embeds, **image_kwargs)
        return prefix, image_embeds

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ClipCapModelOutput:
        """Images -> [`ClipCapModelOutput`] with ``prefix_embeds`` (B, K, E), ``image_embeds`` (B, D) and the tower's
        ``image_outputs``."""
        prefix, image_embeds, tower = self.encode_images(pixel_values, image_embeds, **kwargs)
        return ClipCapModelOutput(prefix_embeds=prefix, image_embeds=image_embeds, image_outputs=tower)


class ClipCapForConditionalGeneration(
    FrozenPartsTrainingMixin, FastDecodingMixin, ClipCapPreTrainedModel, GenerationMixin
):
    """ClipCap: ``model`` ([`ClipCapModel`], images -> prefix) and ``language_model`` (a causal LM, GPT-2 by default).

    Images in: ``get_image_embeddings(pixel_values).pooler_output`` is the image embedding (B, D), what
    ``image_embeds=`` takes (precompute it once per image); ``get_image_features(pixel_values).pooler_output`` is,
    as for every transformers 5.x multimodal model, what the language model consumes: the prefix (B, K, E).
    The CPU decoding speed paths and their switches come from ``fast_decoding.FastDecodingMixin``.

    ```python
    >>> config = ClipCapConfig(vision_config=CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16),
    ...                        text_config=GPT2Config(n_embd=32, n_layer=1, n_head=2), prefix_length=4)
    >>> model = ClipCapForConditionalGeneration(config).eval()
    >>> model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=5).shape[0]
    2
    ```
    """

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

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` that reads 0.1.0 checkpoints and re-applies the config's freezing."""
        if not _RENAMES_REGISTERED and "key_mapping" not in kwargs:
            kwargs["key_mapping"] = LEGACY_KEY_RENAMES
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._apply_freezing()
        return loaded

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

    @can_return_tuple
    def get_image_embeddings(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """The image tower alone: ``pooler_output`` is the image embedding (B, D), what ``image_embeds=`` takes; see
        [`ClipCapModel.get_image_embeddings`]."""
        return self.model.get_image_embeddings(pixel_values, return_dict=True, **kwargs)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Images as the language model consumes them: ``pooler_output`` is the prefix (B, K, E) in the LM's dtype,
        ``last_hidden_state`` / ``hidden_states`` / ``attentions`` the tower's; see
        [`ClipCapModel.get_image_features`]. The image embedding (B, D): [`~ClipCapModel.get_image_embeddings`]."""
        features = self.model.get_image_features(pixel_values, return_dict=True, **kwargs)
        features.pooler_output = features.pooler_output.to(self.get_input_embeddings().weight.dtype)
        return features

    def get_prefix(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **image_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix (B, K, E) in the LM's dtype, image_embeds)``; see [`ClipCapModel.get_prefix`]."""
        prefix, image_embeds, _ = self._encode_images(pixel_values, image_embeds, **image_kwargs)
        return prefix, image_embeds

    def _encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **image_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutputWithPooling | None]:
        """[`ClipCapModel.encode_images`] with the prefix (B, K, E) in the LM's dtype."""
        prefix, image_embeds, tower = self.model.encode_images(pixel_values, image_embeds, **image_kwargs)
        return prefix.to(self.get_input_embeddings().weight.dtype), image_embeds, tower

    @can_return_tuple
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
        **kwargs: Any,
    ) -> ClipCapOutput | tuple:
        r"""Caption likelihood of images, or one decoding step.

        With an image (``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D)) the sequence is ``[prefix (K) ;
        text (L)]``, the text given as ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, E); ``attention_mask``,
        ``position_ids`` (0 = first text token) and ``labels`` (B, L) (-100 ignored) cover the text only. The
        first caption token is predicted from the last prefix position. ``shift_labels``, ``num_items_in_batch``
        and ``ignore_index`` reach ``self.loss_function``. Without an image, the inputs go straight to the LM
        (``generate``'s decoding steps). ``cache`` is the LM's key/value cache; ``past_key_values`` (its name
        before transformers 5.24) is accepted, with a ``FutureWarning`` under transformers >= 5.24.
        ``output_hidden_states`` / ``output_attentions`` reach the LM and the image tower.

        Returns a [`ClipCapOutput`] with ``logits`` (B, K + L, V) (or the ``logits_to_keep`` positions) and the
        tower's ``image_outputs``, or its tuple with ``return_dict=False``.
        """
        cache = pop_cache_argument(cache, kwargs, caller=f"{type(self).__name__}.forward")
        loss_kwargs = {
            k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs
        }
        image_kwargs = {k: kwargs.pop(k) for k in _TOWER_INPUTS if k in kwargs}
        image_kwargs.update(
            {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
        )
        with_loss = labels is not None or "shift_labels" in loss_kwargs
        prefix, k, image_outputs = None, 0, None
        if pixel_values is not None or image_embeds is not None:
            prefix, image_embeds, image_outputs = self._encode_images(
                pixel_values, image_embeds, **image_kwargs
            )
            check_text_inputs(
                prefix.shape[0], input_ids, inputs_embeds, attention_mask, position_ids,
                labels, loss_kwargs.get("shift_labels"),
            )  # fmt: skip
            k = prefix.shape[1]
            if input_ids is not None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            inputs_embeds, attention_mask, position_ids = join_prefix(
                prefix, inputs_embeds, attention_mask, position_ids
            )
            input_ids = None
        elif with_loss:
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
        outputs, logits, text_logits = self._language_model_logits(lm_inputs, logits_to_keep, with_loss)
        return ClipCapOutput(
            loss=self._caption_loss(text_logits, k, labels, **loss_kwargs) if with_loss else None,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            prefix_embeds=prefix,
            image_embeds=image_embeds,
            image_outputs=image_outputs,
            **cache_kwargs(output_cache(outputs)),
        )

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

    # ------------------------------------------------------------------ generation

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
            pixel_values: (B, 3, H, W) images (SigLIP2: with ``pixel_attention_mask``, ``spatial_shapes``), or
            image_embeds: (B, D) (or (B, N, D) with ``mapping_input="tokens"``) precomputed image embeddings.
            attention_mask: (B, L) mask of the prompt.
            **generate_kwargs: anything ``GenerationMixin.generate`` takes, notably
                ``inputs_embeds`` (B, L, E): the prompt as embeddings, after the prefix (with or without its ids);
                ``position_ids`` (B, L): the prompt's positions as ``forward`` takes them (0 = first text token);
                ``cache`` (``past_key_values`` before transformers 5.24) with ``input_ids`` = the sequences so far:
                continue a generation (the image may be left out: the cache holds the prefix);
                ``use_cache=False``: every step re-runs the whole sequence, prefix included;
                ``prompt_lookup_num_tokens``: prompt lookup decoding (batch size 1). A separate assistant model
                (``assistant_model``, ``assistant_early_exit``) is refused.

        Returns:
            Token ids (B * num_return_sequences, T): the generated tokens, after the prompt ids when given (the
            decoder-only convention); or a ``GenerateOutput`` when asked.
        """
        check_generation_kwargs(self.config, self.generation_config, inputs, generate_kwargs)
        if inputs is not None and input_ids is not None:
            raise ValueError("Pass the prompt once: as `inputs` or as `input_ids`.")
        input_ids = inputs if input_ids is None else input_ids
        caller = f"{type(self).__name__}.generate"
        cache = pop_cache_argument(generate_kwargs.pop("cache", None), generate_kwargs, caller=caller)
        prompt_embeds = generate_kwargs.pop("inputs_embeds", None)
        position_ids = generate_kwargs.pop("position_ids", None)
        image_kwargs = {k: generate_kwargs.pop(k) for k in _TOWER_INPUTS if k in generate_kwargs}
        if pixel_values is not None or image_embeds is not None:
            prefix, _ = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds, **image_kwargs)
        elif cache is not None:  # a continuation: the cache holds the prefix already
            prefix = self._prefix_placeholder(cache, input_ids, prompt_embeds)
        elif prompt_embeds is not None:  # plain decoder-only use: the LM continuing given embeddings
            return super().generate(
                input_ids=input_ids,
                inputs_embeds=prompt_embeds,
                attention_mask=attention_mask,
                **({} if position_ids is None else {"position_ids": position_ids}),
                **generate_kwargs,
            )
        else:
            check_image_inputs(self.config, self.vision_model is not None, None, None)  # raises: no image
        check_prompt_inputs(prefix.shape[0], input_ids, prompt_embeds, attention_mask, position_ids)
        if prompt_embeds is None and input_ids is not None:
            prompt_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds, full_mask, input_ids, positions = generation_sequence(
            prefix, prompt_embeds, input_ids, attention_mask, position_ids
        )
        use_cache = self._generation_uses_cache(generate_kwargs)
        if not use_cache and cache is not None:
            raise ValueError("`use_cache=False` cannot continue from a `cache`: drop one of them.")
        if positions is not None:
            generate_kwargs["position_ids"] = positions
        if use_cache:
            cache = self._prefill_for_beams(inputs_embeds, full_mask, generate_kwargs, cache)
        if cache is not None:
            generate_kwargs[CACHE_KWARG] = cache
        decoding = PrefixDecoding(
            offset=inputs_embeds.shape[1] - (0 if input_ids is None else input_ids.shape[1]),
            use_cache=use_cache,
        )
        return super().generate(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=full_mask,
            prefix_decoding=decoding,
            **generate_kwargs,
        )

    def _generation_uses_cache(self, generate_kwargs: dict[str, Any]) -> bool:
        """``use_cache`` as ``generate`` resolves it: the keyword, else the generation config's (default True)."""
        if generate_kwargs.get("use_cache") is not None:
            return bool(generate_kwargs["use_cache"])
        config = generate_kwargs.get("generation_config") or self.generation_config
        return getattr(config, "use_cache", True) is not False

    def _prefix_placeholder(
        self, cache: Any, input_ids: torch.Tensor | None, prompt_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Zeros (B, K, E) standing for a prefix that ``cache`` already holds (a continued generation): ``generate``
        feeds only the positions the cache lacks, so these are never run."""
        text = input_ids if input_ids is not None else prompt_embeds
        k = self.config.prefix_length
        cached = int(cache.get_seq_length())
        if text is None:
            raise ValueError(
                "To continue from a `cache`, pass the sequences generated so far as `input_ids` (e.g. "
                "`out.sequences`), or pass the image again."
            )
        if cached < k:
            raise ValueError(
                f"The cache holds {cached} positions, fewer than the {k} image prefix positions, so it does not hold "
                "the image: pass `pixel_values` or `image_embeds` with it."
            )
        weight = self.get_input_embeddings().weight
        return weight.new_zeros((text.shape[0], k, weight.shape[1]))

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        prefix_decoding: PrefixDecoding | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``GenerationMixin.prepare_inputs_for_generation``, with ``input_ids`` (B, T) lined up behind the prefix by
        ``prefix_decoding`` (set by [`~ClipCapForConditionalGeneration.generate`]; see
        ``prefix_sequence.PrefixDecoding``): whole-sequence steps without a cache, draft tokens on the first step.

        ``inputs_embeds`` (B, S, E): the sequence ``generate`` started from; ``cache`` is named ``past_key_values``
        by ``generate`` of transformers < 5.24 (both names are listed, as ``generate`` checks its model kwargs
        against this signature).
        """
        kwargs.update(
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
        )
        kwargs[CACHE_KWARG] = cache if cache is not None else past_key_values
        if prefix_decoding is not None:
            kwargs = prefix_decoding.step_inputs(input_ids, kwargs, self.get_input_embeddings(), CACHE_KWARG)
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    @torch.no_grad()
    def interpret_prefix(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        tokenizer: Any = None,
        top_k: int = 1,
        **image_inputs: Any,
    ) -> list[list[Any]]:
        """Nearest vocabulary tokens (cosine similarity) of each prefix vector (paper, section 4.7).

        Returns one list of K entries per image: token strings with a ``tokenizer``, token ids without; with
        ``top_k > 1`` each entry is a list of the ``top_k`` nearest, best first (``interpretation.nearest_tokens``).
        ``image_inputs``: the tower's other inputs (SigLIP2's ``pixel_attention_mask``, ``spatial_shapes``).
        """
        prefix, _ = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds, **image_inputs)
        return nearest_tokens(prefix, self.get_input_embeddings().weight, tokenizer, top_k)

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
        load_kwargs = {k: config_kwargs.pop(k) for k in _LOAD_KEYS if k in config_kwargs}
        config_load_kwargs = {k: v for k, v in load_kwargs.items() if k not in ("dtype", "torch_dtype")}
        vision = None
        if vision_model_name_or_path is not None:
            vision = load_pretrained_tower(vision_model_name_or_path, **load_kwargs)
        check_language_config(AutoConfig.from_pretrained(text_model_name_or_path, **config_load_kwargs))
        text = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, **load_kwargs)
        vision_config = vision.config if vision is not None else None
        model = cls(ClipCapConfig(vision_config=vision_config, text_config=text.config, **config_kwargs))
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
