"""What training's data loaders read: caption rows over cached image embeddings, validation images, streams.

``training/train.py`` wires these: :func:`embed_split` encodes a split's images once (through
:mod:`modeling_clipcap.embedding_cache`) and returns the embeddings in the split's row order;
:class:`CachedCaptionDataset` pairs them with every caption; :class:`EvalImageDataset` gives validation
images (embeddings or pixels) with their row index; :func:`stream_caption_pairs` flattens a streamed
``datasets`` dataset into (image, caption) pairs without reading it up front.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from .embedding_cache import build_embedding_cache
from .image_io import load_image


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` that depends only on ``seed`` and the epoch (``set_epoch``).

    Every process computes the same order, so Accelerate's batch sharding gives process ``r`` the
    batches ``r, r + P, ...`` of that order: one process with batch 2B sees the same global batches
    as two processes with batch B, and a resumed run sees the same order as the interrupted one.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class CachedCaptionDataset(torch.utils.data.Dataset):
    """(image, caption) rows over cached embeddings: row ``i`` -> ``{"image_embeds": (D,), "caption": str}``."""

    def __init__(self, embeds: torch.Tensor, rows: list[int], captions: list[str]):
        self.embeds = embeds
        self.rows = rows
        self.captions = captions

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image_embeds": self.embeds[self.rows[i]], "caption": self.captions[i]}


class EvalImageDataset(torch.utils.data.Dataset):
    """Validation images: row ``i`` -> ``{"image_embeds": (D,), "index": i}`` from cached embeddings,
    or ``{"pixel_values": (3, H, W), "index": i}`` from the images (vision tower not frozen)."""

    def __init__(
        self, embeds: torch.Tensor | None = None, images: list[Any] | None = None, image_processor: Any = None
    ):
        if (embeds is None) == (images is None):
            raise ValueError(
                "EvalImageDataset takes embeds or images (with image_processor), not both or neither."
            )
        self.embeds = embeds
        self.images = images
        self.image_processor = image_processor

    def __len__(self) -> int:
        return self.embeds.shape[0] if self.embeds is not None else len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.embeds is not None:
            return {"image_embeds": self.embeds[i], "index": i}
        image = load_image(self.images[i])
        return {
            "pixel_values": self.image_processor([image], return_tensors="pt")["pixel_values"][0],
            "index": i,
        }


@dataclass
class EmbeddedSplit:
    """A split after :func:`embed_split`: ``embeds`` (N, D) row ``i`` belongs to ``images[i]``."""

    embeds: torch.Tensor
    images: datasets.Dataset
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def embed_split(
    model: Any, image_processor: Any, images: datasets.Dataset, **cache_kwargs: Any
) -> EmbeddedSplit:
    """Image embeddings of a split (each unique image encoded once, cached on disk), in the split's order.

    Args:
        images: rows with ``image`` and ``image_id`` (what :func:`modeling_clipcap.data.load_caption_dataset`
            returns); rows whose image was skipped as unreadable are dropped from the result.
        **cache_kwargs: passed to :func:`modeling_clipcap.embedding_cache.build_embedding_cache`
            (``cache_dir``, ``batch_size``, ``dtype``, ``device``, ``on_bad_image``, ``desc``, ...).
    """
    cache = build_embedding_cache(
        model, image_processor, images["image"], keys=images["image_id"], **cache_kwargs
    )
    index = cache.index
    keep = [i for i, key in enumerate(images["image_id"]) if key in index]
    if len(keep) != len(images):
        images = images.select(keep)
    order = torch.tensor([index[key] for key in images["image_id"]], dtype=torch.long)
    stats = {"encoded": cache.num_encoded, "reused": cache.num_reused, "path": str(cache.path)}
    return EmbeddedSplit(cache.embeddings()[order], images, stats, list(cache.skipped))


def stream_caption_pairs(
    stream: datasets.IterableDataset, image_column: str = "image", caption_column: str = "caption"
) -> datasets.IterableDataset:
    """A streamed dataset of images with one caption or a list of them -> ``{"image", "caption"}`` pairs.

    Nothing is read here: the result is as lazy as ``stream`` (images stay undecoded until the collator).
    Empty captions are dropped, the others stripped.
    """
    if isinstance((stream.features or {}).get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    return stream.map(
        _explode_batch,
        batched=True,
        remove_columns=list(stream.column_names or []),
        fn_kwargs={"image_column": image_column, "caption_column": caption_column},
    )


def _explode_batch(
    batch: dict[str, list[Any]], image_column: str, caption_column: str
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"image": [], "caption": []}
    for image, captions in zip(batch[image_column], batch[caption_column]):
        for caption in captions if isinstance(captions, list) else [captions]:
            if isinstance(caption, str) and caption.strip():
                out["image"].append(image)
                out["caption"].append(caption.strip())
    return out


__all__ = [
    "CachedCaptionDataset",
    "EmbeddedSplit",
    "EpochShuffleSampler",
    "EvalImageDataset",
    "embed_split",
    "stream_caption_pairs",
]
