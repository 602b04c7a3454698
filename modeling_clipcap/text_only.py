"""Text-only training (CapDec): the decoder learns from captions alone, reading the text tower's caption embedding
plus Gaussian noise where the image embedding goes.

CLIP-style towers put an image and its caption near each other but not on the same point (the modality gap);
noise of about the gap's size during training makes the mapper robust to it, so at inference it reads the image
embedding (the same towers' image side, projected into the joint space by the ClipCap model's
``image_projection``) as one more noisy caption embedding. CapDec used a variance of 0.016 on normalised CLIP
embeddings (a standard deviation of 0.126 per coordinate), the default here when no paired sample is given.

:func:`estimate_noise_std` measures the gap on a small paired sample instead: the root mean square, over the
sample's image-caption pairs and the embedding's coordinates, of the difference between the normalised image
embedding and the normalised embedding of one of its captions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: CapDec's noise: variance 0.016 on L2-normalised embeddings
DEFAULT_NOISE_STD = math.sqrt(0.016)

__all__ = ["DEFAULT_NOISE_STD", "NoisyTextEmbeddings", "estimate_noise_std"]


class NoisyTextEmbeddings(torch.utils.data.Dataset):
    """Caption rows for text-only training: row ``i`` -> ``{"image_embeds": (P,) the caption's normalised text
    embedding plus fresh N(0, noise_std^2) noise per coordinate, "caption": str}``."""

    def __init__(
        self, embeddings: Any, captions: Sequence[str], noise_std: float, prompts: Sequence[str] | None = None
    ):
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}.")
        self.embeddings = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(captions):
            raise ValueError(
                f"embeddings {tuple(self.embeddings.shape)} do not match {len(captions)} captions; expected (N, P)."
            )
        self.captions = list(captions)
        self.noise_std = float(noise_std)
        self.prompts = list(prompts) if prompts is not None else None  # per row (retrieval augmentation)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        embed = self.embeddings[i]
        row = {"image_embeds": embed + self.noise_std * torch.randn_like(embed), "caption": self.captions[i]}
        return row if self.prompts is None else row | {"prompt": self.prompts[i]}


def estimate_noise_std(towers: Any, images: Sequence[Any], captions: Sequence[str]) -> dict[str, float]:
    """The modality gap of ``towers`` (``retrieval.Towers``) on paired ``images`` and ``captions`` (one caption per
    image): ``{"noise_std": RMS per-coordinate difference of the normalised embeddings, "mean_cosine": mean
    image-caption cosine, "pairs": n}``."""
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(
            f"a paired sample needs as many images as captions (got {len(images)} and {len(captions)})."
        )
    image = towers.encode_images(list(images))
    text = towers.encode_texts(list(captions))
    difference = image - text
    return {
        "noise_std": float(np.sqrt(np.mean(difference**2))),
        "mean_cosine": float(np.mean(np.sum(image * text, axis=1))),
        "pairs": len(images),
    }
