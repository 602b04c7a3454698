"""Cache of image embeddings: each unique image is encoded once, then reused by later runs.

With a frozen vision tower, training never needs to run the tower twice on the same image. This module
encodes a list of images in batches (decoding in ``DataLoader`` workers, progress bar, optional
mixed-precision dtype), stores what the mapping network consumes as Parquet, in the layout ``clipcap embed``
writes (:func:`modeling_clipcap.shards.embedding_table`), and finds it again next time by fingerprint:

* ``mapping_input="pooled"``: the tower's image embedding (``pooler_output`` of
  ``get_image_embeddings``; CLIP: the projected embedding), (D,) float32 per image;
* ``mapping_input="tokens"``: the tower's token features (``last_hidden_state``; a CNN's feature map
  flattened to (h*w, C)), (N, D) float32 per image. SigLIP2's NaFlex inputs (``pixel_attention_mask``,
  ``spatial_shapes``) reach the tower with the pixels, and all N patch slots are stored, padded ones
  included, because that is what the mapper reads when the model is given the pixels.

Every output of the image processor is passed to the tower (not only ``pixel_values``).

The fingerprint covers everything that changes the result:

* the encoder: a SHA-256 of every tensor of the vision tower (weights and buffers), its config,
  the image processor's settings, the compute dtype and ``mapping_input`` (a pooled cache is never
  read for a tokens model, nor the reverse);
* the data: the images' keys and identities (for files: resolved path, size and modification
  time; for bytes and PIL images: a hash of the content);
* the bad-image policy and the version of the way embeddings are computed (``EMBEDDING_VERSION``).

Layout (``CACHE_FORMAT_VERSION`` 3)::

    CACHE_DIR/clipcap-embeds-v3-<fingerprint>/
        embeddings.parquet   clipcap embed's columns without captions: key (string) and image_embeds
                             (D float32 per image) or, for tokens, patch_tokens (N x D float32 per image)
        cache_info.json      format_version, fingerprints, dtype, embedding_shape, skipped images, ...

A cache folder is written to a temporary sibling and renamed into place, so an interrupted run
never leaves a half-written cache that a later run would trust. A cache of format 2 (the same fingerprint in
``clipcap-embeds-<fingerprint>/``, a ``datasets`` Arrow folder ``data/`` with ``image_key`` / ``image_embeds``)
is read once, written in this layout and removed; an INFO log line says so, and nothing is encoded again.

Example::

    cache = build_embedding_cache(model, processor.image_processor, images=paths, cache_dir="cache")
    embeds = cache.embeddings()            # (M, D) float32 (tokens: (M, N, D)), row i for cache.keys[i]
    row = cache.index[key]                 # key -> row
    view = cache.rows([2, 0])              # rows read from disk: view[0] is row 2's (D,) or (N, D) tensor
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .image_io import ImageLoadError, check_bad_image_policy, describe_source, load_image
from .shards import EMBEDDING_COLUMNS, embedding_table, embedding_values, write_embedding_parquet

__all__ = [
    "CACHE_FORMAT_VERSION",
    "EMBEDDING_VERSION",
    "CachedRows",
    "EmbeddingCache",
    "build_embedding_cache",
    "encode_images",
    "encoder_fingerprint",
    "image_identity",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the way embeddings are computed changes; part of the fingerprint.
#: 2: mapping_input in the fingerprint; token features; every image-processor output reaches the tower.
EMBEDDING_VERSION = "2"
#: The stored layout, named in the folder but not in the fingerprint (a new layout converts, it does not re-encode).
#: 2: a ``datasets`` Arrow folder in clipcap-embeds-<fp>/;
#: 3: Parquet (shards.embedding_table) in clipcap-embeds-v3-<fp>/.
CACHE_FORMAT_VERSION = "3"
EMBEDDINGS_FILE = "embeddings.parquet"
INFO_FILE = "cache_info.json"
#: Parquet row groups of about this size: a row read alone (token features, CachedRows) reads its whole group.
ROW_GROUP_BYTES = 1 << 18
MAPPING_INPUTS = ("pooled", "tokens")


def _mapping_input(model: Any, mapping_input: str | None) -> str:
    """``mapping_input`` as given, else the model config's (``"pooled"`` for a bare encoder)."""
    value = mapping_input or getattr(getattr(model, "config", None), "mapping_input", None) or "pooled"
    if value not in MAPPING_INPUTS:
        raise ValueError(f"mapping_input must be 'pooled' or 'tokens', got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def _hash_tensor(hasher: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    hasher.update(str(t.dtype).encode())
    hasher.update(str(tuple(tensor.shape)).encode())
    hasher.update(t.view(torch.uint8).numpy().tobytes())


def encoder_fingerprint(
    model: Any,
    image_processor: Any = None,
    dtype: torch.dtype = torch.float32,
    mapping_input: str | None = None,
) -> str:
    """SHA-256 (hex) of what determines the embeddings: the vision tower's tensors and config, the
    image processor's settings, the compute dtype and what is stored (pooled embedding or tokens).

    Args:
        model: a ClipCap model (its ``vision_model`` is hashed) or any ``nn.Module`` encoder.
        image_processor: the processor that turns images into ``pixel_values`` (its settings are hashed).
        dtype: the dtype the encoder runs in.
        mapping_input: ``"pooled"`` or ``"tokens"`` (default: the model config's ``mapping_input``).
    """
    mapping_input = _mapping_input(model, mapping_input)
    encoder = getattr(model, "vision_model", None) or model
    hasher = hashlib.sha256()
    hasher.update(f"clipcap-embedding-cache/{EMBEDDING_VERSION}/{dtype}/{mapping_input}".encode())
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        hasher.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        hasher.update(name.encode())
        _hash_tensor(hasher, tensor)
    projection = getattr(getattr(model, "model", None), "image_projection", None)
    if projection is not None:  # config.joint_embed_dim: the embeddings are the projected ones
        _hash_tensor(hasher, projection.weight)
    if image_processor is not None:
        settings = image_processor.to_json_string() if hasattr(image_processor, "to_json_string") else ""
        hasher.update(settings.encode())
    return hasher.hexdigest()


def image_identity(source: Any) -> str:
    """A string that changes when the image changes, without decoding it.

    Files: resolved path, size and modification time (nanoseconds). Bytes and ``datasets`` image
    dicts with bytes: SHA-256 of the bytes. PIL images: SHA-256 of mode, size and pixels.
    """
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is not None:
            return image_identity(bytes(data))
        if path:
            return image_identity(path)
        return "empty-record"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(bytes(source)).hexdigest()
    if isinstance(source, Image.Image):
        digest = hashlib.sha256(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
        return "pil:" + digest.hexdigest()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        try:
            stat = path.stat()
            return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return f"file:{path}:missing"
    return "object:" + describe_source(source)


def _data_fingerprint(keys: Sequence[str], identities: Sequence[str], on_bad_image: str) -> str:
    hasher = hashlib.sha256(f"policy={on_bad_image}".encode())
    for key, ident in zip(keys, identities):
        hasher.update(key.encode() + b"\0" + ident.encode() + b"\n")
    return hasher.hexdigest()


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


class _ImageList(torch.utils.data.Dataset):
    """Loads image ``i`` (RGB PIL) or returns the load error message; runs in DataLoader workers."""

    def __init__(self, sources: Sequence[Any], names: Sequence[str]):
        self.sources = sources
        self.names = names

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        try:
            return i, load_image(self.sources[i], name=self.names[i]), None
        except ImageLoadError as err:
            return i, None, str(err)


class _ProcessBatch:
    """Collate: runs the image processor on the good images of a batch (in the worker).

    ``inputs`` holds every tensor the processor returns: ``pixel_values`` and, for SigLIP2's NaFlex
    processor, ``pixel_attention_mask`` (B, N) and ``spatial_shapes`` (B, 2), which the tower needs too.
    """

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, items: list[tuple[int, Any, str | None]]) -> dict[str, Any]:
        good = [(i, img) for i, img, err in items if err is None]
        bad = [(i, err) for i, _, err in items if err is not None]
        inputs = None
        if good:
            processed = self.image_processor([img for _, img in good], return_tensors="pt")
            inputs = {k: v for k, v in processed.items() if torch.is_tensor(v)}
        return {"indices": [i for i, _ in good], "inputs": inputs, "bad": bad}


@torch.no_grad()
def encode_images(
    model: Any,
    image_processor: Any,
    images: Sequence[Any],
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    on_bad_image: str = "fail",
    show_progress: bool = True,
    desc: str = "Encoding images",
    mapping_input: str | None = None,
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Encode images with the model's image tower in batches.

    Args:
        model: a ClipCap model with a vision tower (``get_image_embeddings``).
        image_processor: turns a list of PIL images into ``pixel_values`` (B, 3, H, W) (SigLIP2: patches
            (B, N, 3*p*p) with ``pixel_attention_mask`` and ``spatial_shapes``; all of them reach the tower).
        images: anything :func:`modeling_clipcap.image_io.load_image` reads (paths, bytes, PIL, dicts).
        names: names for error messages (default: described from the sources).
        batch_size: images per encoder call.
        dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or ``None``/float32 for fp32.
        device: where to run (default: the model's device).
        num_workers: ``DataLoader`` workers decoding and preprocessing images.
        on_bad_image: ``"fail"`` raises on the first unreadable image; ``"skip"`` leaves it out and reports it.
        show_progress: show a tqdm bar.
        mapping_input: ``"pooled"`` (the image embedding, ``pooler_output``) or ``"tokens"`` (the token
            features, ``last_hidden_state``); default: the model config's ``mapping_input``.

    Returns:
        ``(embeds, rows, skipped)``: ``embeds`` (M, D) float32 on CPU for the M readable images ((M, N, D) for
        tokens), ``rows`` their positions in ``images`` (ascending), ``skipped`` ``(name, reason)`` per bad image.
    """
    from tqdm.auto import tqdm

    on_bad_image = check_bad_image_policy(on_bad_image)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if getattr(model, "vision_model", None) is None:
        raise ValueError(
            "The model has no vision tower (vision_config=None), so there is nothing to encode: "
            "provide precomputed image_embeds instead."
        )
    tokens = _mapping_input(model, mapping_input) == "tokens"
    names = list(names) if names is not None else [describe_source(s) for s in images]
    if device is None:
        device = next(model.vision_model.parameters()).device
    loader = torch.utils.data.DataLoader(
        _ImageList(images, names),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_ProcessBatch(image_processor),
        generator=torch.Generator(),  # iterating must not consume the global RNG (training reproducibility)
    )
    device = torch.device(device)
    use_autocast = dtype is not None and dtype != torch.float32
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    rows: list[int] = []
    skipped: list[tuple[str, str]] = []
    try:
        with tqdm(total=len(images), desc=desc, unit="img", disable=not show_progress) as bar:
            for batch in loader:
                for i, reason in batch["bad"]:
                    if on_bad_image == "fail":
                        raise ImageLoadError(
                            reason + " (use --on_bad_image skip to leave bad images out and list them)",
                            source=names[i],
                        )
                    skipped.append((names[i], reason))
                if batch["inputs"] is not None:
                    inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
                    with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_autocast):
                        features = model.get_image_embeddings(**inputs, return_dict=True)
                    embeds = features.last_hidden_state if tokens else features.pooler_output
                    if chunks and embeds.shape[1:] != chunks[0].shape[1:]:
                        raise ValueError(
                            f"{desc}: the image tower gave features of shape {tuple(embeds.shape[1:])} for one "
                            f"batch and {tuple(chunks[0].shape[1:])} for another; token features are stored "
                            "per image at one size: make the image processor give every image the same size "
                            "(resize and crop)."
                        )
                    chunks.append(embeds.float().cpu())
                    rows.extend(batch["indices"])
                bar.update(len(batch["indices"]) + len(batch["bad"]))
    finally:
        model.train(was_training)
    dim = model.config.image_embed_dim
    embeds = torch.cat(chunks) if chunks else torch.empty((0, 0, dim) if tokens else (0, dim))
    return embeds, rows, skipped


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------


class CachedRows(torch.utils.data.Dataset):
    """Rows of a cache read from its Parquet file as they are asked for: ``view[i]`` is the (D,) or (N, D) float32
    tensor of cache row ``order[i]``. Token features of a large data set need not fit in memory: a row costs one
    read of its row group (about ``ROW_GROUP_BYTES``); the last group read is kept for the rows after it.

    ``shape`` is ``(len(view), *row shape)``, like the tensor :meth:`EmbeddingCache.embeddings` would give.
    """

    def __init__(self, source: Path | Any, column: str, order: Sequence[int]):
        self.source = source  # the Parquet file, or a pyarrow.Table in memory
        self.column = column
        self.order = [int(i) for i in order]
        self._file: Any = None
        self._group: tuple[int, torch.Tensor] | None = None
        if isinstance(source, Path):
            meta = self._parquet().metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        else:
            sizes = [source.num_rows]
        self._starts = list(itertools.accumulate(sizes, initial=0))

    def _parquet(self) -> Any:
        import pyarrow.parquet as pq

        if self._file is None:
            self._file = pq.ParquetFile(self.source, memory_map=True)
        return self._file

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open the file themselves
        return self.__dict__ | {"_file": None, "_group": None}

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.order[i]
        if not isinstance(self.source, Path):
            return embedding_values(self.source.column(self.column).slice(row, 1))[0]
        group = bisect.bisect_right(self._starts, row) - 1
        if self._group is None or self._group[0] != group:
            read = self._parquet().read_row_group(group, columns=[self.column])
            self._group = (group, embedding_values(read.column(0)))
        return self._group[1][row - self._starts[group]].clone()

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self[0].shape) if len(self) else (0,)


@dataclass
class EmbeddingCache:
    """Image embeddings in the Parquet layout of :func:`modeling_clipcap.shards.embedding_table`: ``key`` and the
    column of ``mapping_input`` (``image_embeds`` (D,) float32, or ``patch_tokens`` (N, D) float32 per image).

    Attributes:
        table: the rows as a ``pyarrow.Table`` when not saved (``path`` None); a saved cache is read from
            ``path / "embeddings.parquet"`` when asked.
        path: the folder it lives in (``None`` when not saved).
        fingerprint: the cache key (encoder + data).
        num_encoded: images encoded by this call (0 when everything came from disk).
        num_reused: images read from an existing cache.
        skipped: ``(name, reason)`` of images that could not be read (``on_bad_image="skip"``).
        mapping_input: ``"pooled"`` or ``"tokens"``: what the rows hold.
        num_encoded_per_process: images each process encoded (``processes``; ``[num_encoded]`` otherwise).
    """

    table: Any
    path: Path | None
    fingerprint: str
    num_encoded: int
    num_reused: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    mapping_input: str = "pooled"
    num_encoded_per_process: list[int] = field(default_factory=list)

    @property
    def column(self) -> str:
        """The embedding column: ``shards.EMBEDDING_COLUMNS[mapping_input]``."""
        return EMBEDDING_COLUMNS[self.mapping_input]

    def _source(self) -> Path | Any:
        return self.path / EMBEDDINGS_FILE if self.path is not None else self.table

    def _read(self, column: str) -> Any:
        import pyarrow.parquet as pq

        source = self._source()
        table = pq.read_table(source, columns=[column], memory_map=True) if self.path else source
        return table.column(column)

    @property
    def keys(self) -> list[str]:
        """Image keys, row order."""
        return self._read("key").to_pylist()

    @property
    def index(self) -> dict[str, int]:
        """Image key -> row of :meth:`embeddings`."""
        return {key: i for i, key in enumerate(self.keys)}

    def embeddings(self) -> torch.Tensor:
        """All embeddings in memory, (M, D) float32 ((M, N, D) for tokens), row ``i`` for ``keys[i]``."""
        return embedding_values(self._read(self.column))

    def rows(self, order: Sequence[int]) -> CachedRows:
        """Rows ``order`` read lazily from disk (``view[i]`` is row ``order[i]``)."""
        return CachedRows(self._source(), self.column, order)


def _folder(
    cache_dir: str | os.PathLike, fingerprint: str, format_version: str = CACHE_FORMAT_VERSION
) -> Path:
    """The cache folder of ``fingerprint`` in a layout (format 2 had no version in the name)."""
    version = f"v{format_version}-" if format_version != "2" else ""
    return Path(cache_dir) / f"clipcap-embeds-{version}{fingerprint}"


def _table(keys: list[str], embeds: torch.Tensor, mapping_input: str) -> Any:
    """Cache rows: ``clipcap embed``'s layout without captions."""
    return embedding_table(keys, {mapping_input: embeds})


def _write_rows(table: Any, path: Path) -> None:
    """The one Parquet writer (``shards.write_embedding_parquet``), in row groups of about ``ROW_GROUP_BYTES``."""
    row_bytes = table.nbytes // max(table.num_rows, 1)
    write_embedding_parquet(path, table, row_group_rows=max(1, ROW_GROUP_BYTES // max(row_bytes, 1)))


def _save_atomically(table: Any, target: Path, info: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_rows(table, tmp / EMBEDDINGS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:
            if (target / INFO_FILE).exists():  # another process won the race: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_format_2(old: Path, target: Path) -> None:
    """A finished cache of format 2 at ``old`` (same fingerprint) and none at ``target``: its rows are written in
    this layout at ``target`` and ``old`` is removed. An unreadable one is left alone (its images get encoded)."""
    if not (old / INFO_FILE).is_file() or (target / INFO_FILE).exists():
        return
    import datasets

    try:
        info = json.loads((old / INFO_FILE).read_text())
        rows = datasets.load_from_disk(str(old / "data")).with_format("numpy")[:]
        keys = [str(k) for k in rows["image_key"]]
        # (M, D) or (M, N, D) float32, as format 2 stored them
        embeds = torch.from_numpy(rows["image_embeds"]).float()
        table = _table(keys, embeds, info.get("mapping_input", "pooled"))
    except Exception as err:
        logger.warning(
            f"embedding cache {old}: not readable as a format-2 (Arrow) cache ({type(err).__name__}: {err}); "
            f"its images are encoded again into {target.name}."
        )
        return
    info = info | {
        "format_version": CACHE_FORMAT_VERSION,
        "converted_from_format": info.get("format_version"),
    }
    _save_atomically(table, target, info)
    shutil.rmtree(old, ignore_errors=True)
    logger.info(
        f"embedding cache {old.name}: converted from the Arrow layout (format 2) to Parquet (format "
        f"{CACHE_FORMAT_VERSION}) in {target.name}: {len(keys)} embeddings read, none encoded again; "
        "the old folder was removed."
    )


def build_embedding_cache(
    model: Any,
    image_processor: Any,
    images: Sequence[Any],
    keys: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    on_bad_image: str = "fail",
    show_progress: bool = True,
    desc: str = "Encoding images",
    encoder_hash: str | None = None,
    mapping_input: str | None = None,
    processes: Any = None,
) -> EmbeddingCache:
    """Embeddings of ``images`` from the cache when present, else encode each unique image once and store them.

    Args:
        model: a ClipCap model with a (frozen) vision tower.
        image_processor: the processor used to make ``pixel_values``.
        images: image sources (paths, bytes, PIL images, ``datasets`` image dicts).
        keys: one key per image (default: :func:`image_identity`). Duplicate keys are encoded once (the
            first source with that key is used).
        cache_dir: folder of caches; ``None`` computes without storing.
        batch_size, dtype, device, num_workers, on_bad_image, show_progress: see :func:`encode_images`.
        encoder_hash: a precomputed :func:`encoder_fingerprint` (saves re-hashing the weights).
        mapping_input: store the pooled embedding (D,) or the token features (N, D) of each image (default: the
            model config's ``mapping_input``); part of the fingerprint.
        processes: the ``accelerate`` state (``Accelerator`` / ``PartialState``) of a multi-process run, called by
            every process: each encodes every ``num_processes``-th unique image into a part next to the cache
            (``cache_dir`` must be shared by the processes), the main process merges the parts into the one
            cache, and a failure in any process raises in all of them with that process's message.

    Returns:
        An :class:`EmbeddingCache`. With ``on_bad_image="skip"`` the unreadable images have no row.
    """
    on_bad_image = check_bad_image_policy(on_bad_image)  # "error" and "fail" share a cache
    unique_keys, unique_sources = _unique_images(images, keys)
    compute_dtype = dtype or torch.float32
    mapping_input = _mapping_input(model, mapping_input)
    enc_fp = encoder_hash or encoder_fingerprint(model, image_processor, compute_dtype, mapping_input)
    # default keys are the identities already (a SHA-256 of each image's bytes, or a stat per file): not twice
    identities = unique_keys if keys is None else [image_identity(s) for s in unique_sources]
    data_fp = _data_fingerprint(unique_keys, identities, on_bad_image)
    fingerprint = hashlib.sha256(f"{enc_fp}{data_fp}{mapping_input}".encode()).hexdigest()[:32]

    target = _folder(cache_dir, fingerprint) if cache_dir is not None else None
    if target is not None:
        # a format-2 cache is converted by the main process; the others then find the new one
        with processes.main_process_first() if processes is not None else contextlib.nullcontext():
            _convert_format_2(_folder(cache_dir, fingerprint, "2"), target)
        if (target / INFO_FILE).exists():
            return _stored_cache(target, fingerprint, mapping_input)

    start = time.perf_counter()
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    sharded = world > 1 and target is not None
    mine = list(range(rank, len(unique_sources), world)) if sharded else list(range(len(unique_sources)))
    names = [
        describe_source(s) if not isinstance(s, dict) else str(s.get("path") or k)
        for s, k in zip(unique_sources, unique_keys)
    ]
    encode_kwargs = dict(
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        num_workers=num_workers,
        on_bad_image=on_bad_image,
        show_progress=show_progress,
        desc=desc,
        mapping_input=mapping_input,
    )
    if sharded:
        table, rows, skipped, per_process, shape = _encode_part(
            model, image_processor, unique_sources, unique_keys, names, mine, target, processes, encode_kwargs
        )
    else:
        embeds, rows, skipped = encode_images(
            model, image_processor, unique_sources, names=names, **encode_kwargs
        )
        per_process, shape = [len(rows)], list(embeds.shape[1:])
    _fail_if_nothing_read(
        len(unique_sources), per_process, skipped, target if sharded and rank == 0 else None
    )
    dim = int(shape[-1]) if shape and shape[-1] else int(model.config.image_embed_dim)
    if not sharded or (rank == 0 and table is None):  # (sharded, nothing readable: an empty cache)
        empty = torch.empty((0, 0, dim) if mapping_input == "tokens" else (0, dim))
        table = _table([unique_keys[r] for r in rows], embeds if not sharded else empty, mapping_input)
    info = {
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "encoder_fingerprint": enc_fp,
        "data_fingerprint": data_fp,
        "dtype": str(compute_dtype),
        "num_images": len(unique_keys),
        "num_embeddings": len(rows),
        "image_embed_dim": dim,
        "mapping_input": mapping_input,
        "embedding_shape": shape,
        "skipped": [list(s) for s in skipped],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if target is not None:
        if rank == 0:
            _save_atomically(table, target, info)
        if sharded:
            processes.wait_for_everyone()
            if rank == 0:
                shutil.rmtree(_parts_folder(target), ignore_errors=True)
        table = None  # read from the saved file from now on
    return EmbeddingCache(
        table=table,
        path=target,
        fingerprint=fingerprint,
        num_encoded=sum(per_process),
        num_reused=0,
        skipped=skipped,
        mapping_input=mapping_input,
        num_encoded_per_process=per_process,
    )


def _fail_if_nothing_read(
    num_images: int, per_process: list[int], skipped: list[Any], parts_of: Path | None
) -> None:
    """Every image was skipped as unreadable: raise (naming some) instead of writing an empty cache."""
    if num_images == 0 or sum(per_process) > 0:
        return
    if parts_of is not None:
        shutil.rmtree(_parts_folder(parts_of), ignore_errors=True)
    named = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
    raise ImageLoadError(
        f"no readable image among the {num_images} given (on_bad_image='skip' skipped them all: "
        f"{named}{' ...' if len(skipped) > 3 else ''}). Check the image paths or files."
    )


def _unique_images(images: Sequence[Any], keys: Sequence[str] | None) -> tuple[list[str], list[Any]]:
    """The first source of each distinct key, in order (keys default to :func:`image_identity`)."""
    if keys is None:
        keys = [image_identity(s) for s in images]
    elif len(keys) != len(images):
        raise ValueError(f"got {len(keys)} keys for {len(images)} images; pass one key per image.")
    first: dict[str, Any] = {}
    for key, source in zip(keys, images):
        first.setdefault(str(key), source)
    return list(first), list(first.values())


def _stored_cache(target: Path, fingerprint: str, mapping_input: str) -> EmbeddingCache:
    """A finished cache folder, reused as it is (nothing encoded)."""
    import pyarrow.parquet as pq

    info = json.loads((target / INFO_FILE).read_text())
    return EmbeddingCache(
        table=None,
        path=target,
        fingerprint=fingerprint,
        num_encoded=0,
        num_reused=pq.ParquetFile(target / EMBEDDINGS_FILE).metadata.num_rows,
        skipped=[tuple(s) for s in info.get("skipped", [])],
        mapping_input=mapping_input,
    )


def _parts_folder(target: Path) -> Path:
    return target.parent / f".{target.name}.parts"


def _encode_part(
    model: Any,
    image_processor: Any,
    sources: list[Any],
    keys: list[str],
    names: list[str],
    mine: list[int],
    target: Path,
    processes: Any,
    encode_kwargs: dict[str, Any],
) -> tuple[Any, list[int], list[tuple[str, str]], list[int], list[int]]:
    """This process encodes ``sources[i] for i in mine`` into ``<cache>.parts/part-<rank>.parquet``; the parts are
    merged (on the main process) in unique-image order. Returns ``(merged table (main process) or None, rows,
    skipped, images encoded per process, the shape of one embedding)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from accelerate.utils import gather_object

    rank = processes.process_index
    part = _parts_folder(target) / f"part-{rank}.parquet"
    outcome: dict[str, Any] = {"rows": [], "skipped": [], "error": None, "shape": []}
    try:
        embeds, rows, skipped = encode_images(
            model,
            image_processor,
            [sources[i] for i in mine],
            names=[names[i] for i in mine],
            **encode_kwargs,
        )
        rows = [mine[r] for r in rows]
        if rows:
            part.parent.mkdir(parents=True, exist_ok=True)
            _write_rows(_table([keys[r] for r in rows], embeds, encode_kwargs["mapping_input"]), part)
        outcome.update(rows=rows, skipped=[list(s) for s in skipped], shape=list(embeds.shape[1:]))
    except Exception as err:  # reported by every process, so none is left waiting for this one
        outcome["error"] = f"process {rank}: {type(err).__name__}: {err}"
    outcomes = gather_object([outcome])
    errors = [o["error"] for o in outcomes if o["error"]]
    if errors:
        raise ValueError(f"encoding {target.name} failed: " + "; ".join(errors))
    per_process = [len(o["rows"]) for o in outcomes]
    rows = sorted(r for o in outcomes for r in o["rows"])
    skipped = [tuple(s) for o in outcomes for s in o["skipped"]]
    order = {name: i for i, name in enumerate(names)}
    skipped.sort(key=lambda s: order.get(s[0], 0))
    shape = next((o["shape"] for o in outcomes if o["rows"]), [])
    merged = None
    if rank == 0 and rows:
        parts = [
            pq.read_table(_parts_folder(target) / f"part-{r}.parquet")
            for r, o in enumerate(outcomes)
            if o["rows"]
        ]
        position = {r: i for i, r in enumerate(r for o in outcomes for r in o["rows"])}
        merged = pa.concat_tables(parts).take([position[r] for r in rows])
    return merged, rows, skipped, per_process, shape
