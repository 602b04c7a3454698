"""ClipCap: prefix captioning (an image tower, a mapping network, a causal LM) on transformers building blocks.

Data flow (B images, K = ``prefix_length``, D = ``image_embed_dim``, E = the LM's width, L = caption tokens)::

    pixel_values (B, 3, H, W) -> image tower -> image_embeds (B, D) or token features (B, N, D) } ClipCapModel
    image_embeds -> [optional per-vector L2 norm] -> mapping network -> prefix (B, K, E)        } (the base)
    [prefix ; embed(input_ids)] (B, K + L, E) -> causal LM -> logits (B, K + L, V)

``get_image_embeddings`` gives the first line's output (the tower's), ``get_image_features`` the second's (the
prefix as ``pooler_output``, transformers 5.x's convention), ``get_prefix`` both tensors.
The tower (CLIP by default) and the LM (GPT-2 by default) are unmodified transformers models built through the
Auto classes (``towers.py`` says what is read from each family); the paper's two mapping networks are in
``mapping_networks.py``; ``compat.py`` adapts to the installed transformers release. This file, top to bottom:
the checks of what a user passes, the prefix and the text as one LM sequence, the CPU decoding speed paths
(``FastDecodingMixin``, each behind a switch), and the models, whose ``generate`` goes through
``GenerationMixin`` with ``inputs_embeds``.
"""

from __future__ import annotations

# compat checks the transformers release first
from .compat import (
    CACHE_KWARG,
    cache_kwargs,
    output_cache,
    pop_cache_argument,
    register_key_renames,
    slice_logits_to_keep,
)

# isort: split
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast, ModelOutput
from transformers.utils import can_return_tuple

from .configuration_clipcap import ClipCapConfig
from .mapping_networks import MAPPING_NETWORKS, ClipCapMLPMapper, ClipCapTransformerMapper
from .towers import (
    build_language_model,
    build_vision_tower,
    check_language_config,
    check_pixel_values,
    has_fast_paths,
    image_embed_dim,
    image_features,
    load_pretrained_tower,
    position_limit,
    tower_dtype,
)

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


# ------------------------------------------------------------ checks of user inputs


#: ``generate`` options that draft tokens with a second model (or a truncated copy of this one) that is given
#: ``input_ids`` alone, without the image prefix: its drafts would come from a model that never saw the image.
#: (``prompt_lookup_num_tokens`` drafts from the ids themselves and is verified by this model with its prefix:
#: allowed, same tokens as greedy decoding.)
ASSISTED_DECODING_OPTIONS = ("assistant_model", "assistant_early_exit")


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
        check_pixel_values(config.vision_config, pixel_values)
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


# ------------------------------------------------------------ prefix + text: one sequence
# The K prefix vectors (B, K, E) go in front of the text (B, L, E); prefix positions are always attended, the text
# keeps its mask. For generate, a left-padded prompt's padding moves in front of the prefix (generation_sequence),
# and PrefixDecoding lines generate's growing token ids up with that sequence at each step.


def join_prefix(
    prefix: torch.Tensor,
    text_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
    """``[prefix ; text]`` embeddings (B, K + L, E), mask (B, K + L) and positions (B, K + L).

    Args:
        prefix: (B, K, E) mapped prefix.
        text_embeds: (B, L, E) text embeddings, or ``None`` for the prefix alone.
        attention_mask: (B, L) mask of the text, or ``None`` (everything attended).
        position_ids: (B, L) positions of the text (0 = its first token), or ``None``.

    Without ``position_ids``, a left-padded row gets the positions of the same row unpadded (right padding
    keeps GPT-2's 0, 1, 2...); given text positions are shifted by K, and come with a mask (all ones when none
    was given): without a mask and a cache, transformers reads a jump in the positions (text positions that do
    not start at 0) as the start of another packed sequence, which would cut the text off the prefix. Inputs are
    assumed checked (:func:`check_text_inputs`).
    """
    batch, k = prefix.shape[:2]
    text_length = 0 if text_embeds is None else text_embeds.shape[1]
    embeds = prefix if text_embeds is None else torch.cat([prefix, text_embeds.to(prefix.dtype)], dim=1)
    ones = torch.ones((batch, k), dtype=torch.long, device=prefix.device)
    if position_ids is not None:
        position_ids = torch.cat([ones.cumsum(-1) - 1, position_ids.to(prefix.device) + k], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones((batch, text_length), dtype=torch.long, device=prefix.device)
    if attention_mask is not None:
        if position_ids is None:  # left padding shifts a row's text back by its number of leading pads
            leading = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1)
            steps = torch.arange(k + text_length, device=prefix.device).expand(batch, -1)
            position_ids = torch.where(steps < k, steps, (steps - leading).clamp_min(0))
        attention_mask = torch.cat([ones.to(attention_mask.dtype), attention_mask], dim=1)
    return embeds, attention_mask, position_ids


def generation_sequence(
    prefix: torch.Tensor,
    prompt_embeds: torch.Tensor | None,
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor | None, torch.LongTensor | None]:
    """What ``generate`` starts from: ``[prefix ; prompt]`` embeddings (B, K + L, E), mask (B, K + L), the
    prompt ids (B, L) and positions (B, K + L), each row reordered to read ``[pad ... pad, prefix, prompt]`` (a
    left-padded prompt would otherwise leave its padding between the prefix and the prompt).

    Args:
        prefix: (B, K, E) mapped prefix.
        prompt_embeds: (B, L, E) embeddings of the prompt, or ``None`` without a prompt.
        input_ids: (B, L) the prompt's ids, or ``None`` (no prompt, or a prompt given as embeddings only).
        attention_mask: (B, L) the prompt's mask, or ``None``.
        position_ids: (B, L) the prompt's positions as ``forward`` takes them (0 = first text token), or ``None``:
            returned shifted by K behind the prefix's 0 .. K-1 (``None`` stays ``None``: ``generate`` derives
            positions from the mask).
    """
    embeds, mask, positions = join_prefix(prefix, prompt_embeds, attention_mask, position_ids)
    mask = (
        torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask.long()
    )
    positions = positions if position_ids is not None else None
    if bool((mask == 0).any()):
        order = torch.sort(mask, dim=1, stable=True).indices  # pads (0) first, order kept otherwise
        embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds))
        mask = torch.gather(mask, 1, order)
        positions = None if positions is None else torch.gather(positions, 1, order)
    if input_ids is not None and attention_mask is not None and bool((attention_mask == 0).any()):
        # keep returned prompt ids aligned with their (left-padded) rows
        input_ids = torch.gather(input_ids, 1, torch.sort(attention_mask.long(), dim=1, stable=True).indices)
    return embeds, mask, input_ids, positions


@dataclass(frozen=True)
class PrefixDecoding:
    """How ``generate``'s token ids line up with the language-model sequence it decodes.

    ``generate`` starts from ``inputs_embeds`` (B, S, E) = ``[pad ; prefix ; prompt]`` and keeps growing
    ``input_ids`` (B, T): the prompt's ids (if it has ids), then the generated (or draft) tokens. The LM sequence
    is ``offset + T`` positions long: ``offset`` = S minus the number of prompt ids (the prefix, plus a prompt given
    as embeddings only); ids past the first S - ``offset`` follow the starting embeddings.

    Attributes:
        offset: LM positions that have no entry in ``input_ids`` (K, or K + L for a prompt given as embeddings).
        use_cache: ``False`` re-runs the whole sequence at every step, prefix included (``generate(use_cache=False)``).
    """

    offset: int
    use_cache: bool = True

    def step_inputs(
        self,
        input_ids: torch.LongTensor,
        kwargs: dict[str, Any],
        embed: Callable[[torch.Tensor], torch.Tensor],
        cache_name: str,
    ) -> dict[str, Any]:
        """``prepare_inputs_for_generation``'s keyword arguments for one step, adjusted to the prefix.

        Args:
            input_ids: (B, T) ``generate``'s ids so far (with draft tokens, in assisted decoding).
            kwargs: ``generate``'s model kwargs for this step (``inputs_embeds`` (B, S, E), mask, positions, cache).
            embed: the LM's input embeddings, ids (B, n) -> (B, n, E).
            cache_name: the installed transformers' name of the cache argument (``compat.CACHE_KWARG``).

        Without a cache, every step gets the whole sequence ``[starting embeddings ; embeds of the later ids]``
        (B, offset + T, E). With one, the first step also embeds ids that follow the starting embeddings (the draft
        tokens prompt lookup proposes before the first forward), fed from the first position the cache lacks.
        Otherwise ``kwargs`` are returned as they are.
        """
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return kwargs
        later = input_ids[:, embeds.shape[1] - self.offset :]  # (B, n) ids after the starting embeddings
        length = self.offset + input_ids.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2 and mask.shape[1] < length:
            # assisted decoding sizes the mask to the ids (T), not to the LM sequence (offset + T): what it cut off
            # or lacks comes after the only padding there is (leading), so it is attended
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], length - mask.shape[1])], dim=1)
            kwargs = {**kwargs, "attention_mask": mask}
        if not self.use_cache:
            if (
                mask is None
            ):  # without a mask and a cache, a jump in given positions would read as packed sequences
                mask = torch.ones((input_ids.shape[0], length), dtype=torch.long, device=embeds.device)
            full = torch.cat([embeds, embed(later).to(embeds.dtype)], dim=1)
            kwargs = {k: v for k, v in kwargs.items() if k != cache_name}
            return {
                **kwargs,
                "inputs_embeds": full,
                "attention_mask": mask,
                "is_first_iteration": True,
                "next_sequence_length": None,
                "use_cache": False,
            }
        if kwargs.get("is_first_iteration") and later.shape[1] > 0:
            cache = kwargs.get(cache_name)
            past = 0 if cache is None else int(cache.get_seq_length())
            full = torch.cat([embeds, embed(later).to(embeds.dtype)], dim=1)
            return {**kwargs, "inputs_embeds": full, "next_sequence_length": full.shape[1] - past}
        return kwargs


# ------------------------------------------------------------ CPU decoding speed paths
# Each gives the tokens and scores of the stock transformers code it replaces and switches itself off where it
# could not (docs/performance.md says what each buys): in-place EOS suppression (swapped into the processor list
# of the private GenerationMixin._get_logits_processor hook, see compat.py), the output layer in vocabulary blocks
# on CPU, and one prefill of [prefix ; prompt] per image shared by its beams. FastDecodingMixin wires them in.


class EosSuppressionUntilLength(LogitsProcessor):
    """In-place twin of ``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor``.

    While ``input_ids`` (B, T) has fewer than ``min_length`` tokens, the EOS columns of ``scores`` (B, V) are set
    to ``-inf`` in place. The stock processors build a (V,) mask and a new (B, V) tensor with ``torch.where``
    at every step (a full-vocabulary temporary per processor and step). The scores produced are identical.

    Only used where writing into ``scores`` is safe (not when raw logits are returned).
    """

    def __init__(self, min_length: int, eos_token_id: torch.Tensor):
        self.min_length = int(min_length)
        self.eos_token_id = torch.as_tensor(eos_token_id).reshape(-1).to(torch.long)
        self._ids = [i for i in self.eos_token_id.tolist() if i >= 0]  # a few ints, indexable on any device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] < self.min_length:
            # out-of-vocabulary ids are ignored, as the stock processors' mask ignores them
            scores[..., [i for i in self._ids if i < scores.shape[-1]]] = -math.inf
        return scores


def _in_place_twin(processor: LogitsProcessor) -> LogitsProcessor:
    """The in-place twin of a stock minimum-length processor, or the processor itself."""
    try:
        if type(processor) is MinLengthLogitsProcessor:
            return EosSuppressionUntilLength(processor.min_length, processor.eos_token_id)
        if type(processor) is MinNewTokensLengthLogitsProcessor:
            return EosSuppressionUntilLength(
                processor.prompt_length_to_skip + processor.min_new_tokens, processor.eos_token_id
            )
    except AttributeError:
        pass  # a release renamed the processor's fields: keep the stock processor (same scores)
    return processor


def swap_min_length_processors(processors: LogitsProcessorList) -> LogitsProcessorList:
    """A copy of ``processors`` with the stock minimum-length processors replaced by in-place twins."""
    return LogitsProcessorList(_in_place_twin(p) for p in processors)


def blocked_output_layer(lm_head: nn.Module, hidden_states: torch.Tensor, block: int | None) -> torch.Tensor:
    """An output layer: hidden states (..., E) -> logits (..., V), in vocabulary blocks where it pays.

    On CPU, in float32 and without gradients (decoding), the (V, E) weight is applied in blocks of ``block``
    vocabulary rows: BLAS runs narrower products faster there (measured in ``docs/performance.md``). Each logit
    is the same dot product over E: equal up to float rounding (a BLAS may sum a narrower product in another
    order). Everywhere else (GPU, other dtypes, training, hooked or quantized layers) it is ``lm_head(...)``.
    """
    weight = getattr(lm_head, "weight", None)
    if (
        block is None
        or type(lm_head) is not nn.Linear  # quantized / hooked layers keep their own forward
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or hidden_states.dtype != torch.float32
        or torch.is_grad_enabled()
        or lm_head.bias is not None
        or weight.shape[0] <= block
    ):
        return lm_head(hidden_states)
    blocks = [
        F.linear(hidden_states, weight[start : start + block]) for start in range(0, weight.shape[0], block)
    ]
    return torch.cat(blocks, dim=-1)


def shared_prefill_expand_size(generation_config: Any, kwargs: dict[str, Any]) -> int:
    """How many copies of each image's sequence ``generate`` will decode (beams or returned sequences).

    1 (no shared prefill) whenever the caller controls the cache, gives positions of its own, decodes without a
    cache (``use_cache=False``: every step re-runs the whole sequence), drafts tokens (prompt lookup), or asks for
    per-position outputs that a shared prefill would not produce (hidden states / attentions of the prompt
    positions).
    """
    config = kwargs.get("generation_config") or generation_config
    if any(
        kwargs.get(k) is not None for k in ("cache", "past_key_values", "custom_generate", "position_ids")
    ):
        return 1
    use_cache = kwargs.get("use_cache")
    if (getattr(config, "use_cache", True) if use_cache is None else use_cache) is False:
        return 1
    for name in (
        "cache_implementation",
        "prefill_chunk_size",
        "output_hidden_states",
        "output_attentions",
        "prompt_lookup_num_tokens",
    ):
        if kwargs.get(name, getattr(config, name, None)):
            return 1
    num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    num_return = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    return max(int(num_beams), int(num_return))


def prefill_shared_prefix(
    decoder: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, expand_size: int
) -> Any:
    """Run ``decoder`` once per image over all but the last position of ``[prefix ; prompt]``; copy the cache.

    Args:
        decoder: the language model's body (GPT-2's ``transformer``).
        inputs_embeds: (B, S, E) left-padded ``[pad ; prefix ; prompt]`` embeddings.
        attention_mask: (B, S) their mask.
        expand_size: number of beams / returned sequences per image.

    Returns:
        A ``DynamicCache`` of S - 1 positions for B * expand_size rows (each image's rows adjacent, as
        ``generate`` expands its inputs). ``generate`` then feeds only the last position of each row;
        positions and masking match what it would have computed itself (positions from the mask's cumsum).
    """
    prefill_mask = attention_mask[:, :-1]
    outputs = decoder(
        inputs_embeds=inputs_embeds[:, :-1],
        attention_mask=None if bool(prefill_mask.all()) else prefill_mask,
        position_ids=(prefill_mask.cumsum(-1) - 1).clamp_min(0),
        use_cache=True,
    )
    cache = output_cache(outputs)
    cache.batch_repeat_interleave(expand_size)
    return cache


class FastDecodingMixin:
    """The speed paths of ``ClipCapForConditionalGeneration``, each behind a switch.

    Set a switch on an instance to compare with the stock path: ``fast_eos_suppression`` (in-place EOS
    suppression), ``cpu_output_layer_block`` (the output layer in blocks of this many vocabulary rows; None: one
    call), ``shared_prefill`` (one prefill shared by the beams of an image). The last two need a language model
    of ``towers.FAST_PATH_LANGUAGE_FAMILIES``; any other keeps its own forward.
    """

    fast_eos_suppression: bool = True
    cpu_output_layer_block: int | None = 1024
    shared_prefill: bool = True

    def _output_layer(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM's output layer (..., E) -> (..., V); in vocabulary blocks when decoding on CPU."""
        return blocked_output_layer(self.get_output_embeddings(), hidden_states, self.cpu_output_layer_block)

    def _language_model_logits(
        self, lm_inputs: dict[str, Any], logits_to_keep: int | torch.Tensor, with_loss: bool
    ) -> tuple[Any, torch.Tensor, Any]:
        """Run the LM on ``lm_inputs`` (the (B, S, E) sequence): ``(outputs, logits (B, S', V), text_logits)``.

        ``logits`` covers the ``logits_to_keep`` positions; ``text_logits(window)`` gives the logits (B, L, V) of a
        slice of positions for the loss. A fast-path family runs its body, then its plain output layer (blocked on
        CPU); any other LM runs its own forward (soft-capping, logit scaling... stay its own).
        """
        if has_fast_paths(self.config.text_config):
            outputs = self.get_decoder()(**lm_inputs)
            hidden_states = outputs.last_hidden_state  # (B, S, E)
            logits = self._output_layer(slice_logits_to_keep(hidden_states, logits_to_keep))
            head = self.get_output_embeddings()
            return outputs, logits, lambda window: head(hidden_states[:, window])
        outputs = self.language_model(**lm_inputs, logits_to_keep=0 if with_loss else logits_to_keep)
        all_logits = outputs.logits
        logits = slice_logits_to_keep(all_logits, logits_to_keep) if with_loss else all_logits
        # contiguous: transformers' causal-LM loss flattens the window with .view
        return outputs, logits, lambda window: all_logits[:, window].contiguous()

    def _shared_prefill_expand_size(self, kwargs: dict[str, Any]) -> int:
        return shared_prefill_expand_size(self.generation_config, kwargs)

    def _prefill_for_beams(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        generate_kwargs: dict[str, Any],
        cache: Any,
    ) -> Any:
        """The cache ``generate`` starts from: ``cache`` as given, or one prefill of ``[prefix ; prompt]``
        (B, S, E) per image copied to its beams / returned sequences (needs a plain ``DynamicCache``)."""
        expand_size = self._shared_prefill_expand_size({**generate_kwargs, "cache": cache})
        if expand_size > 1 and inputs_embeds.shape[1] > 1 and self.shared_prefill:
            if has_fast_paths(self.config.text_config):
                return prefill_shared_prefix(self.get_decoder(), inputs_embeds, attention_mask, expand_size)
        return cache

    def _get_logits_processor(self, generation_config: Any, *args: Any, **kwargs: Any) -> LogitsProcessorList:
        # Private GenerationMixin hook (see compat.py): if a release drops it, generate stops calling this
        # override and the stock processors run (same scores, slower).
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if not self.fast_eos_suppression or getattr(generation_config, "output_logits", False):
            return processors  # raw logits are returned: the stock processors never write into them
        return swap_min_length_processors(processors)


# ------------------------------------------------------------ models


def nearest_vocabulary_tokens(
    prefix: torch.Tensor, vocab: torch.Tensor, tokenizer: Any = None, top_k: int = 1
) -> list[list[Any]]:
    """The ``top_k`` vocabulary entries (rows of ``vocab`` (V, E)) nearest by cosine to each prefix vector of
    ``prefix`` (B, K, E): per image K token strings (with a ``tokenizer``) or ids, each a list when ``top_k > 1``."""
    sims = F.normalize(prefix.float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).T  # (B, K, V)
    top = sims.topk(min(top_k, vocab.shape[0]), dim=-1).indices.tolist()  # (B, K, top_k)

    def render(token_id: int) -> Any:
        if tokenizer is None:
            return token_id
        return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)

    return [[render(ids[0]) if top_k == 1 else [render(i) for i in ids] for ids in image] for image in top]


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
            if module.token_positions is not None:
                init.normal_(module.token_positions, mean=0.0, std=0.02)
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
        # the tower's pooled embedding -> the joint image-text space (only with config.joint_embed_dim)
        self.image_projection = (
            nn.Linear(image_embed_dim(vision, "pooled"), config.joint_embed_dim, bias=False)
            if vision is not None and config.joint_embed_dim is not None
            else None
        )
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
            out = image_features(self.vision_model, self.config.vision_config, pixel_values, **kwargs)
            if self.image_projection is not None:
                out.pooler_output = self.image_projection(
                    out.pooler_output.to(self.image_projection.weight.dtype)
                )
            return out

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


class ClipCapForConditionalGeneration(FastDecodingMixin, ClipCapPreTrainedModel, GenerationMixin):
    """ClipCap: ``model`` ([`ClipCapModel`], images -> prefix) and ``language_model`` (a causal LM, GPT-2 by default).

    Images in: ``get_image_embeddings(pixel_values).pooler_output`` is the image embedding (B, D), what
    ``image_embeds=`` takes (precompute it once per image); ``get_image_features(pixel_values).pooler_output`` is,
    as for every transformers 5.x multimodal model, what the language model consumes: the prefix (B, K, E).
    The CPU decoding speed paths and their switches come from [`FastDecodingMixin`].

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

    def _apply_freezing(self) -> None:
        """Freeze what the config names (``freeze_vision``, ``freeze_language_model``): no gradients, eval mode."""
        if self.vision_model is not None and self.config.freeze_vision:
            self.vision_model.requires_grad_(False).eval()
            if self.model.image_projection is not None:  # part of the frozen image side
                self.model.image_projection.requires_grad_(False)
        if self.config.freeze_language_model:
            self.language_model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ClipCapForConditionalGeneration:
        """``nn.Module.train``, with the frozen parts kept in eval mode (no dropout)."""
        super().train(mode)
        if mode:
            self._apply_freezing()
        return self

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
        [`PrefixDecoding`]): whole-sequence steps without a cache, draft tokens on the first step.

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
        ``top_k > 1`` each entry is a list of the ``top_k`` nearest, best first.
        ``image_inputs``: the tower's other inputs (SigLIP2's ``pixel_attention_mask``, ``spatial_shapes``).
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
        prefix, _ = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds, **image_inputs)
        return nearest_vocabulary_tokens(prefix, self.get_input_embeddings().weight, tokenizer, top_k)

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
