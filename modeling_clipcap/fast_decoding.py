"""CPU decoding speed paths of ClipCap generation, kept out of the model class.

Each path gives the same tokens and scores as the stock transformers code it replaces and switches
itself off where it could not (see ``docs/performance.md`` for what each one buys):

* :class:`EosSuppressionUntilLength`: an in-place twin of transformers' minimum-length processors;
  :func:`swap_min_length_processors` puts it in their place inside the processor list that
  ``GenerationMixin._get_logits_processor`` (a private hook, see ``compat.py``) builds.
* :func:`blocked_output_layer`: the (V, E) output layer applied in vocabulary blocks on CPU.
* :func:`shared_prefill_expand_size` / :func:`prefill_shared_prefix`: beams (or returned sequences) of one
  image share ``[prefix ; prompt]``, so it runs once per image and the cache is copied to each beam.
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

    1 (no shared prefill) whenever the caller controls the cache or asks for per-position outputs that a
    shared prefill would not produce (hidden states / attentions of the prompt positions).
    """
    config = kwargs.get("generation_config") or generation_config
    if any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "custom_generate")):
        return 1
    for name in ("cache_implementation", "prefill_chunk_size", "output_hidden_states", "output_attentions"):
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
    from .compat import output_cache

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


__all__ = [
    "EosSuppressionUntilLength",
    "blocked_output_layer",
    "prefill_shared_prefix",
    "shared_prefill_expand_size",
    "swap_min_length_processors",
]
