"""CPU decoding speed paths of ClipCap generation, kept out of the model class.

Each path gives the same tokens and scores as the stock transformers code it replaces and switches
itself off where it could not (see ``docs/performance.md`` for what each one buys):

* :class:`EosSuppressionUntilLength`: an in-place twin of transformers' minimum-length processors;
  :func:`swap_min_length_processors` puts it in their place inside the processor list that
  ``GenerationMixin._get_logits_processor`` (a private hook, see ``compat.py``) builds.
* :func:`blocked_output_layer`: the (V, E) output layer applied in vocabulary blocks on CPU.
* :func:`shared_prefill_expand_size` / :func:`prefill_shared_prefix`: beams (or returned sequences) of one
  image share ``[prefix ; prompt]``, so it runs once per image and the cache is copied to each beam.

:class:`FastDecodingMixin` wires them into ``ClipCapForConditionalGeneration``, each behind a switch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)

from .compat import output_cache, slice_logits_to_keep
from .towers import has_fast_paths


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


__all__ = [
    "EosSuppressionUntilLength",
    "FastDecodingMixin",
    "blocked_output_layer",
    "prefill_shared_prefix",
    "shared_prefill_expand_size",
    "swap_min_length_processors",
]
