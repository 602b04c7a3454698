"""CPU decoding speed paths of ClipCap generation, kept out of the model class.

Each path gives the same tokens and scores as the stock transformers code it replaces and switches
itself off where it could not (see ``docs/performance.md`` for what each one buys):

* :class:`EosSuppressionUntilLength`: an in-place twin of transformers' minimum-length processors;
  :func:`swap_min_length_processors` puts it in their place inside the processor list that
  ``GenerationMixin._get_logits_processor`` (a private hook, see ``compat.py``) builds.
* :func:`blocked_output_layer`: the (V, E) output layer applied in vocabulary blocks on CPU.
"""

from __future__ import annotations

import math

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


__all__ = ["EosSuppressionUntilLength", "blocked_output_layer", "swap_min_length_processors"]
