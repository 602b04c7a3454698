"""What training's data loaders read: caption rows over cached image embeddings, validation images, streams.

``training/train.py`` wires these: :func:`embed_split` encodes a split's images once (through
:mod:`modeling_clipcap.embedding_cache`) and returns the embeddings in the split's row order;
:class:`CachedCaptionDataset` pairs them with every caption; :class:`EvalImageDataset` gives validation
images (embeddings or pixels) with their row index; :func:`stream_caption_pairs` flattens a streamed
``datasets`` dataset into (image, caption) pairs without reading it up front.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .captioning import caption_items
from .data import CaptionCollator, explode_captions, load_caption_dataset
from .embedding_cache import build_embedding_cache, encoder_fingerprint
from .image_io import check_bad_image_policy, load_image
from .shards import is_shard_source, load_shard_captions, stream_report

logger = logging.getLogger(__name__)


class CachedCaptionDataset(torch.utils.data.Dataset):
    """(image, caption) rows over cached embeddings: row ``i`` -> ``{"image_embeds", "caption": str}``.

    ``image_embeds`` is (D,), or (N, D) token features. ``embeds``: a tensor (M, D) / (M, N, D), or anything
    indexable the same way (``embedding_cache.CachedRows``).
    """

    def __init__(self, embeds: Any, rows: list[int], captions: list[str], prompts: list[str] | None = None):
        self.embeds = embeds
        self.rows = rows
        self.captions = captions
        self.prompts = prompts  # per embedding row: the retrieval prompt of a retrieval-augmented model

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = {"image_embeds": self.embeds[self.rows[i]], "caption": self.captions[i]}
        return row if self.prompts is None else row | {"prompt": self.prompts[self.rows[i]]}


class EvalImageDataset(torch.utils.data.Dataset):
    """Validation images: row ``i`` -> ``{"image_embeds": (D,) or (N, D), "index": i}`` from cached embeddings,
    or ``{"pixel_values": (3, H, W), "index": i}`` from the images (vision tower not frozen), with every other
    tensor the image processor returns (SigLIP2: ``pixel_attention_mask`` (N,), ``spatial_shapes`` (2,))."""

    def __init__(self, embeds: Any = None, images: list[Any] | None = None, image_processor: Any = None):
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
        processed = self.image_processor([load_image(self.images[i])], return_tensors="pt")
        return {**{k: v[0] for k, v in processed.items() if torch.is_tensor(v)}, "index": i}


@dataclass
class EmbeddedSplit:
    """A split after :func:`embed_split`: ``embeds[i]`` belongs to ``images[i]``: a (M, D) tensor of pooled
    embeddings, or for token features (N, D) per image a ``CachedRows`` view read from disk row by row."""

    embeds: Any
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
    stats = {
        "encoded": cache.num_encoded,
        "reused": cache.num_reused,
        "path": str(cache.path),
        "mapping_input": cache.mapping_input,
        "encoded_per_rank": cache.num_encoded_per_process,
    }
    # token features (N, D) per image may not fit in memory: read them from the memory-mapped cache
    embeds = cache.rows(order.tolist()) if cache.mapping_input == "tokens" else cache.embeddings()[order]
    return EmbeddedSplit(embeds, images, stats, list(cache.skipped))


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


# ---------------------------------------------------------------------------------------------------------
# The data of one training run (the keyword arguments are training/train.py's flags of the same names)
# ---------------------------------------------------------------------------------------------------------


def read_splits(
    accelerator: Any,
    *,
    train_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_split: str = "train",
    validation_file: str | None = None,
    validation_split: str = "validation",
    image_dir: str | None = None,
    validation_image_dir: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    streaming: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    on_bad_image: str = "fail",
    mapping_input: str = "pooled",
    read_train: bool = True,
) -> dict[str, Any]:
    """The training split (a ``datasets`` image table, or a stream) and the validation split (or None).

    The training data is ``train_file`` (a caption file, an image folder or shards) or ``dataset_name`` (a
    ``datasets`` dataset, ``dataset_config_name``, split ``train_split``; ``streaming``: read lazily). The
    validation split is ``validation_file``, else ``dataset_name``'s ``validation_split``, else a Karpathy JSON's
    or an image folder's ``validation_split``; the image paths of a caption file are relative to ``image_dir``
    (``validation_image_dir`` for validation). ``max_train_samples`` / ``max_eval_samples`` keep the first N
    images; ``on_bad_image`` is the bad-image policy (``"fail"``, ``"skip"``); ``mapping_input``: which
    precomputed embeddings a Parquet source gives (``shards.EMBEDDING_COLUMNS``); ``read_train=False``: only the
    validation split (text-only training brings its own rows).

    Returns ``{"train", "validation", "reports", "skipped"}``; ``train`` is None for ``streaming`` shards.
    """

    splits: dict[str, Any] = {"reports": [], "skipped": [], "train": None, "validation": None}

    def read(source: str, split: str | None, image_dir: str | None, limit: int | None) -> datasets.Dataset:
        if is_shard_source(source):  # WebDataset tars / Parquet files (modeling_clipcap.shards)
            dataset, report = load_shard_captions(source, split, mapping_input)
        else:
            dataset, report = load_caption_dataset(
                source,
                split,
                image_dir=image_dir,
                config_name=dataset_config_name,
                image_column=image_column,
                caption_column=caption_column,
                on_bad_image=on_bad_image,
            )
        if accelerator.is_main_process:
            logger.info(report.summary())
        splits["reports"].append(report.to_dict())
        splits["skipped"] += [tuple(s) for s in report.skipped_images]
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset

    source = train_file or dataset_name
    train_path = Path(train_file) if train_file else None
    if validation_file or dataset_name:
        validation_source = validation_file or dataset_name
    elif train_path is not None and (
        train_path.suffix.lower() == ".json"  # a Karpathy JSON holds the val split too
        or (train_path.is_dir() and (train_path / validation_split).is_dir())  # <folder>/<split>/
    ):
        validation_source = train_file
    else:
        validation_source = None
    with accelerator.main_process_first():
        if not read_train:
            splits["train"] = None
        elif streaming and is_shard_source(train_file):
            splits["train"] = None  # streamed by shards.build_train_stream
        elif streaming:
            if not dataset_name:
                raise ValueError("--streaming reads --dataset_name, or shards: --train_file 'data/*.tar'.")
            splits["train"] = datasets.load_dataset(
                dataset_name, dataset_config_name, split=train_split, streaming=True
            )
        else:
            splits["train"] = read(source, train_split, image_dir, max_train_samples)
        if validation_source is not None:
            try:
                splits["validation"] = read(
                    validation_source, validation_split, validation_image_dir or image_dir, max_eval_samples
                )
            except (ValueError, KeyError) as err:
                if validation_file:
                    raise
                logger.warning(f"no validation split found ({err}); validation is off.")
    return splits


def build_datasets(
    accelerator: Any,
    model: Any,
    processor: Any,
    *,
    train_file: str | None = None,
    dataset_name: str | None = None,
    streaming: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
    on_bad_image: str = "fail",
    max_caption_length: int = 64,
    embedding_cache: bool = True,
    embedding_cache_dir: str | None = None,
    embedding_batch_size: int = 64,
    preprocessing_num_workers: int = 0,
    shard_stream: Callable[[CaptionCollator], Any] | None = None,
    train_rows: Any = None,
    **split_options: Any,
) -> dict[str, Any]:
    """Training rows, validation captions (for the loss) and validation images (for generation).

    With a frozen vision tower (and ``embedding_cache``), both splits' images are encoded once into the
    embedding cache (``embedding_cache_dir``, batches of ``embedding_batch_size``, ``preprocessing_num_workers``
    loader workers) and the datasets hold ``image_embeds``; otherwise they hold images that the collator turns
    into pixels. The data arguments and ``split_options`` (the other keyword arguments of :func:`read_splits`)
    say what is read. ``streaming`` over shards: ``shard_stream(collator)`` returns the training loader
    (``training/train.py`` passes :func:`modeling_clipcap.shards.build_train_stream`); captions are cut to
    ``max_caption_length`` tokens. ``train_rows``: training rows made elsewhere (text-only training's caption
    embeddings): no training image is read.
    """
    on_bad_image = check_bad_image_policy(on_bad_image)
    splits = read_splits(
        accelerator,
        train_file=train_file,
        dataset_name=dataset_name,
        streaming=streaming,
        image_column=image_column,
        caption_column=caption_column,
        on_bad_image=on_bad_image,
        mapping_input=model.config.mapping_input,
        read_train=train_rows is None,
        **split_options,
    )
    train, validation = splits["train"], splits["validation"]
    frozen_vision = model.vision_model is None or model.config.freeze_vision
    precomputed = train is not None and not streaming and "image_embeds" in train.column_names
    use_cache = frozen_vision and not streaming and embedding_cache and not precomputed and train_rows is None
    if use_cache and model.vision_model is None:
        raise ValueError(
            "This model has no vision tower (embeddings only): train it on precomputed image_embeds "
            "through the Python API; train.py reads images."
        )
    if not frozen_vision and embedding_cache:
        logger.info("freeze_vision=False: images are encoded at every step (no embedding cache).")
    embed_validation = validation is not None and len(validation) > 0 and frozen_vision
    data: dict[str, Any] = {"encode_stats": {}, "skipped": splits["skipped"], "reports": splits["reports"]}
    cache_kwargs: dict[str, Any] = {}
    if use_cache or (embed_validation and model.vision_model is not None):
        model.to(accelerator.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        cache_kwargs = {
            "cache_dir": embedding_cache_dir
            or str(Path(datasets.config.HF_DATASETS_CACHE) / "clipcap_embeddings"),
            "batch_size": embedding_batch_size,
            "dtype": dtype,
            "device": accelerator.device,
            "num_workers": preprocessing_num_workers,
            "on_bad_image": on_bad_image,
            "show_progress": accelerator.is_local_main_process,
            "encoder_hash": encoder_fingerprint(model, processor.image_processor, dtype or torch.float32),
            "processes": accelerator,  # every process encodes its part of the unique images
        }

    def embedded(images: datasets.Dataset, desc: str) -> tuple[torch.Tensor, datasets.Dataset]:
        split = embed_split(model, processor.image_processor, images, desc=desc, **cache_kwargs)
        if accelerator.is_main_process:
            logger.info(f"{desc}: {split.stats['encoded']} images encoded, {split.stats['reused']} reused")
        data["encode_stats"][desc] = split.stats
        data["skipped"].extend(split.skipped)
        return split.embeds, split.images

    source = train_file or dataset_name
    if train_rows is not None:
        data["train"] = train_rows
        train = train_rows
    elif precomputed:  # e.g. Parquet shards written by `clipcap embed`: no image is opened
        data["train"] = _precomputed_rows(train)
    elif use_cache:
        embeds, train = embedded(train, "Encoding train images")
        flat = explode_captions(train.add_column("embed_row", list(range(len(train)))))
        data["train"] = CachedCaptionDataset(embeds, flat["embed_row"], flat["caption"])
        data["train_images"] = train  # image-level rows, in the order of the embeddings
    elif streaming and train is None:
        if shard_stream is None:
            raise ValueError("streaming shards needs shard_stream (e.g. shards.build_train_stream).")
        collator = CaptionCollator(
            processor.tokenizer, max_caption_length, image_processor=processor.image_processor
        )
        data["train"] = data["train_loader"] = shard_stream(collator)
    elif streaming:
        data["train"] = stream_caption_pairs(train, image_column or "image", caption_column or "caption")
    else:
        data["train"] = explode_captions(train).select_columns(["image", "caption"])
    if streaming:
        data["description"] = f"{source} (streaming)"
    else:
        data["description"] = f"{source} ({len(train)} images, {len(data['train'])} captions)"
        if len(data["train"]) == 0:
            raise ValueError(f"{source}: no training captions left (see the data report above).")

    data["val_images"] = data["val_captions"] = data["val_references"] = None
    if validation is not None and len(validation) > 0:
        if "image_embeds" in validation.column_names:
            data["val_captions"] = _precomputed_rows(validation)
            data["val_images"] = EvalImageDataset(embeds=data["val_captions"].embeds)
        elif embed_validation and model.vision_model is not None:
            embeds, validation = embedded(validation, "Encoding validation images")
            flat = explode_captions(validation.add_column("embed_row", list(range(len(validation)))))
            data["val_images"] = EvalImageDataset(embeds=embeds)
            data["val_captions"] = CachedCaptionDataset(embeds, flat["embed_row"], flat["caption"])
            data["validation_images"] = validation
        else:  # validation encodes on the fly
            data["val_images"] = EvalImageDataset(
                images=validation["image"], image_processor=processor.image_processor
            )
            data["val_captions"] = explode_captions(validation).select_columns(["image", "caption"])
        data["val_references"] = validation["captions"]
    return data


def _precomputed_rows(images: datasets.Dataset) -> CachedCaptionDataset:
    """Caption rows over an image-level split that already holds ``image_embeds`` (D,) per image."""
    embeds = images.with_format("torch")[:]["image_embeds"].float()  # (M, D)
    flat = explode_captions(
        images.remove_columns(["image_embeds"]).add_column("row", list(range(len(images))))
    )
    return CachedCaptionDataset(embeds, flat["row"], flat["caption"])


def run_report(accelerator: Any, data: dict[str, Any]) -> dict[str, Any]:
    """What every process did with the data, for ``train_results.json`` (a collective call):
    ``images_encoded_per_rank`` (all splits; zeros when everything came from the cache) and, with a shard
    stream, ``samples_seen_per_rank`` and ``skipped_samples`` (key, shard, reason)."""
    encoded = [0] * accelerator.num_processes
    for stats in data["encode_stats"].values():
        for rank, count in enumerate(stats.get("encoded_per_rank") or []):
            encoded[rank] += count
    report = {"images_encoded_per_rank": encoded}
    return report | (stream_report(accelerator, data["train_loader"]) if "train_loader" in data else {})


def make_dataloaders(
    data: dict[str, Any],
    processor: Any,
    *,
    per_device_train_batch_size: int,
    per_device_eval_batch_size: int,
    max_caption_length: int,
    preprocessing_num_workers: int = 0,
    streaming: bool = False,
) -> tuple[Any, dict[str, torch.utils.data.DataLoader] | None]:
    """The training loader and the validation loaders (images, captions) or None, from :func:`build_datasets`.

    The training rows are shuffled (``streaming``: read in their order). The order is made resumable by the
    ``Accelerator`` that prepares the loader: ``DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)``
    turns the shuffle into Accelerate's ``SeedableRandomSampler``, a permutation drawn from ``seed + epoch``
    alone, the same on every process (iterate it with :func:`epoch_batches`). Every loader has its own generator,
    so iterating one never moves the global RNG (exact resume). A shard stream is returned as it is.
    """
    collator = CaptionCollator(
        processor.tokenizer, max_caption_length, image_processor=processor.image_processor
    )
    if "train_loader" in data:  # streamed from shards: batches, position and padding are its own
        train_dataloader = data["train_loader"]
    else:
        shuffled = {} if streaming else {"shuffle": True, "generator": torch.Generator()}
        train_dataloader = torch.utils.data.DataLoader(
            data["train"],
            batch_size=per_device_train_batch_size,
            collate_fn=collator,
            num_workers=0 if data["encode_stats"] or streaming else preprocessing_num_workers,
            **shuffled,
        )
    if data["val_images"] is None:
        return train_dataloader, None
    kwargs = {"batch_size": per_device_eval_batch_size, "shuffle": False, "generator": torch.Generator()}
    return train_dataloader, {
        "images": torch.utils.data.DataLoader(data["val_images"], **kwargs),
        "captions": torch.utils.data.DataLoader(data["val_captions"], collate_fn=collator, **kwargs),
    }


def epoch_batches(dataloader: Any, epoch: int, skip: int = 0) -> Iterator[Any]:
    """The batches of epoch ``epoch`` of the prepared training loader, after the first ``skip`` (a resumed run).

    With Accelerate's seedable sampler (:func:`make_dataloaders`) the epoch alone decides the order, and process
    ``r`` of ``P`` takes the batches ``r, r + P, ...`` of it. The first ``skip`` batches are dropped by
    ``accelerate.skip_first_batches``, whose loader sets its sampler's epoch again when it starts, to its own
    count of epochs: Accelerate 1.12 starts that count at 0 (1.16 copies it), so the loader is told the epoch.
    A shard stream (``shards.ShardStreamLoader``) restores its own position instead: ``skip`` is 0 for it.
    """
    from accelerate.data_loader import skip_first_batches

    dataloader.set_epoch(epoch)
    if skip:
        dataloader = skip_first_batches(dataloader, skip)
        dataloader.set_epoch(epoch)
    return iter(dataloader)


@torch.no_grad()
def validate(
    accelerator: Any,
    model: Any,
    processor: Any,
    loaders: dict[str, Any],
    references: list[list[str]],
    meteor: bool,
    retrieved_captions: list[list[str]] | None = None,
) -> dict[str, Any]:
    """Validation loss over all captions, then metrics of generated captions (main process).

    ``retrieved_captions``: per validation image the captions retrieved for it (a retrieval-augmented model).

    The RNG states are put back afterwards, so runs with and without validation (or resumed around it)
    draw the same dropout masks.
    """
    from tqdm.auto import tqdm

    from .caption_metrics import compute_caption_metrics, exact_match_rate

    python_state, numpy_state = random.getstate(), np.random.get_state()
    metrics: dict[str, Any] = {}
    unwrapped = accelerator.unwrap_model(model)
    model.eval()
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        loss_sum = torch.zeros((), device=accelerator.device)
        tokens = torch.zeros((), device=accelerator.device)
        for batch in loaders["captions"]:
            n = (batch["labels"] != -100).sum()
            loss_sum += model(**batch, num_items_in_batch=n.clamp_min(1), logits_to_keep=1).loss.float() * n
            tokens += n
        loss_sum, tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(tokens, "sum")
        metrics["eval_loss"] = (loss_sum / tokens.clamp_min(1)).item()
        pairs: list[tuple[int, str]] = []
        for batch in tqdm(
            loaders["images"], desc="Validation captions", disable=not accelerator.is_local_main_process
        ):
            # this process's share of the images, one row each (image_embeds, or pixel_values and the tower's other
            # tensors), captioned through the library's one captioning path in one generate call
            tensors = {k: v for k, v in batch.items() if k != "index" and torch.is_tensor(v)}
            rows = [
                {"image_id": index, **{k: v[i] for k, v in tensors.items()}}
                | (
                    {"retrieved_captions": retrieved_captions[index]}
                    if retrieved_captions is not None
                    else {}
                )
                for i, index in enumerate(batch["index"].tolist())
            ]
            results = caption_items(
                unwrapped,
                processor,
                rows,
                batch_size=len(rows),
                generation_config=unwrapped.generation_config,
            )
            pairs += accelerator.gather_for_metrics(
                [(index, captions[0]) for index, captions, _ in results], use_gather_object=True
            )
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    model.train()
    if accelerator.is_main_process:
        predictions = dict(pairs)
        refs = {i: list(references[i]) for i in predictions}
        try:
            scores = compute_caption_metrics(predictions, refs, spice=False, meteor=meteor)
            metrics.update({f"eval_{k}": v for k, v in scores.items() if isinstance(v, float)})
        except ImportError as err:  # pycocoevalcap missing: keep training, say why
            logger.warning(f"caption metrics unavailable ({err}); logging the loss only.")
        metrics["eval_exact_match"] = exact_match_rate(predictions, refs)
        metrics["eval_samples"] = [
            {"prediction": predictions[i], "references": refs[i][:2]} for i in sorted(predictions)[:3]
        ]
    return metrics


__all__ = [
    "run_report",
    "make_dataloaders",
    "epoch_batches",
    "validate",
    "build_datasets",
    "read_splits",
    "CachedCaptionDataset",
    "EmbeddedSplit",
    "EvalImageDataset",
    "embed_split",
    "stream_caption_pairs",
]
