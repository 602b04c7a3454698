"""How an image prefix and its text become one language-model sequence: embeddings, attention mask, positions.

ClipCap puts the K prefix vectors (B, K, E) in front of the text (B, L, E). Prefix positions are always
attended; the text keeps its mask. For ``generate``, a left-padded prompt's padding is moved in front of the
prefix (:func:`generation_sequence`), as transformers expects of a left-padded batch.
"""

from __future__ import annotations

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
    keeps GPT-2's 0, 1, 2...); given text positions are shifted by K. Inputs are assumed checked
    (``validation.check_text_inputs``).
    """
    batch, k = prefix.shape[:2]
    text_length = 0 if text_embeds is None else text_embeds.shape[1]
    embeds = prefix if text_embeds is None else torch.cat([prefix, text_embeds.to(prefix.dtype)], dim=1)
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


def generation_sequence(
    prefix: torch.Tensor,
    prompt_embeds: torch.Tensor | None,
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor | None]:
    """What ``generate`` starts from: ``[prefix ; prompt]`` embeddings (B, K + L, E), mask (B, K + L) and the
    prompt ids (B, L), each row reordered to read ``[pad ... pad, prefix, prompt]`` (a left-padded prompt would
    otherwise leave its padding between the prefix and the prompt).

    Args:
        prefix: (B, K, E) mapped prefix.
        prompt_embeds: (B, L, E) embeddings of ``input_ids``, or ``None`` without a prompt.
        input_ids: (B, L) the prompt, or ``None``.
        attention_mask: (B, L) the prompt's mask, or ``None``.
    """
    embeds, mask, _ = join_prefix(prefix, prompt_embeds, attention_mask, None)
    mask = (
        torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask.long()
    )
    if bool((mask == 0).any()):
        order = torch.sort(mask, dim=1, stable=True).indices  # pads (0) first, order kept otherwise
        embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds))
        mask = torch.gather(mask, 1, order)
    if input_ids is not None and attention_mask is not None and bool((attention_mask == 0).any()):
        # keep returned prompt ids aligned with their (left-padded) rows
        input_ids = torch.gather(input_ids, 1, torch.sort(attention_mask.long(), dim=1, stable=True).indices)
    return embeds, mask, input_ids


__all__ = ["generation_sequence", "join_prefix"]
