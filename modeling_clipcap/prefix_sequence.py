"""How an image prefix and its text become one language-model sequence: embeddings, attention mask, positions.

ClipCap puts the K prefix vectors (B, K, E) in front of the text (B, L, E). Prefix positions are always
attended; the text keeps its mask. For ``generate``, a left-padded prompt's padding is moved in front of the
prefix (:func:`generation_sequence`), as transformers expects of a left-padded batch; :class:`PrefixDecoding`
lines ``generate``'s token ids up with that sequence at each decoding step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


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
    assumed checked (``validation.check_text_inputs``).
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


__all__ = ["PrefixDecoding", "generation_sequence", "join_prefix"]
