"""Reading a ClipCap prefix back as words: the nearest vocabulary tokens of each prefix vector (paper, section 4.7).

``ClipCapForConditionalGeneration.interpret_prefix`` maps images to their prefix and calls
:func:`nearest_tokens`; the function works on any (B, K, E) prefix and (V, E) embedding matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def nearest_tokens(
    prefix: torch.Tensor, vocab_embeddings: torch.Tensor, tokenizer: Any = None, top_k: int = 1
) -> list[list[Any]]:
    """The vocabulary tokens nearest (cosine similarity) to each prefix vector.

    Args:
        prefix: (B, K, E) prefix embeddings.
        vocab_embeddings: (V, E) the language model's input embedding matrix.
        tokenizer: decodes each token id to its string; ``None`` returns token ids.
        top_k: how many nearest tokens per prefix vector.

    Returns:
        One list of K entries per image: a token (string or id), or with ``top_k > 1`` a list of the ``top_k``
        nearest tokens, best first.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
    prefix_dirs = F.normalize(prefix.float(), dim=-1)  # (B, K, E)
    sims = prefix_dirs @ F.normalize(vocab_embeddings.float(), dim=-1).T  # (B, K, V)
    top = sims.topk(min(top_k, vocab_embeddings.shape[0]), dim=-1).indices.tolist()  # (B, K, top_k)

    def render(token_id: int) -> Any:
        if tokenizer is None:
            return token_id
        return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)

    return [[render(ids[0]) if top_k == 1 else [render(i) for i in ids] for ids in image] for image in top]


__all__ = ["nearest_tokens"]
