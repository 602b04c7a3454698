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

Isotropic noise models the gap poorly where much of it is one shared direction (the mean image-minus-caption
difference): noise spreads its norm over every coordinate, so the decoder rarely sees a shift of that size along
that direction. With a paired sample, ``shift`` moves every caption embedding by the sample's mean difference
(onto the image side) and the noise is the RMS of what is left (``estimate_noise_std(...)["residual_std"]``). On
the demo's towers the mean difference is small (norm 0.08 of a 0.35 gap) and the shift changed little.
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
    embedding (plus ``shift`` (P,), the mean modality gap, when given) plus fresh N(0, noise_std^2) noise per
    coordinate, "caption": str}``."""

    def __init__(
        self,
        embeddings: Any,
        captions: Sequence[str],
        noise_std: float,
        prompts: Sequence[str] | None = None,
        shift: Any = None,
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
        self.shift = None if shift is None else torch.as_tensor(np.asarray(shift), dtype=torch.float32)
        if self.shift is not None and self.shift.shape != self.embeddings.shape[1:]:
            raise ValueError(
                f"shift {tuple(self.shift.shape)} does not match the embeddings' width {self.embeddings.shape[1]}."
            )
        self.prompts = list(prompts) if prompts is not None else None  # per row (retrieval augmentation)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        embed = self.embeddings[i] if self.shift is None else self.embeddings[i] + self.shift
        row = {"image_embeds": embed + self.noise_std * torch.randn_like(embed), "caption": self.captions[i]}
        return row if self.prompts is None else row | {"prompt": self.prompts[i]}


def estimate_noise_std(towers: Any, images: Sequence[Any], captions: Sequence[str]) -> dict[str, float]:
    """The modality gap of ``towers`` (``retrieval.Towers``) on paired ``images`` and ``captions`` (one caption per
    image): ``{"noise_std": RMS per-coordinate difference of the normalised embeddings, "mean_cosine": mean
    image-caption cosine, "pairs": n, "gap_norm": norm of the mean difference, "residual_std": RMS per-coordinate
    difference once the mean difference is taken off, "shift": the mean difference (P,) as a list}``."""
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(
            f"a paired sample needs as many images as captions (got {len(images)} and {len(captions)})."
        )
    image = towers.encode_images(list(images))
    text = towers.encode_texts(list(captions))
    difference = image - text
    shift = difference.mean(axis=0)
    return {
        "noise_std": float(np.sqrt(np.mean(difference**2))),
        "mean_cosine": float(np.mean(np.sum(image * text, axis=1))),
        "pairs": len(images),
        "gap_norm": float(np.linalg.norm(shift)),
        "residual_std": float(np.sqrt(np.mean((difference - shift) ** 2))),
        "shift": [float(x) for x in shift],
    }
