"""WebDataset tar shards and Parquet files as caption data, streamed across processes and loader workers.

Sources are a glob or brace pattern (``data/shard-{0000..0099}.tar``, ``emb/*.parquet``, any fsspec URL):

* **WebDataset** tars as img2dataset writes them: ``{key}.jpg`` (any image extension) + ``{key}.txt``
  (the caption) + ``{key}.json`` (a ``caption`` field is used when there is no ``.txt``);
* **Parquet** files with ``caption`` and either ``image`` (bytes, or a ``{"bytes", "path"}`` struct) or
  ``image_embeds`` (precomputed, e.g. by ``clipcap embed``); ``key`` names a row (default
  ``<file stem>/<row>``).

Every shard is read by datasets' own builders (``"webdataset"``, ``"parquet"``) with images left undecoded;
images are decoded where batches are made (:class:`StreamCollator`, in the loader workers), so a broken
sample is skipped and reported by key (``on_bad_image="skip"``) or fails naming its shard and key. A shard
that is missing or unreadable fails with its name (:class:`ShardError`).

:class:`ShardStreamLoader` streams them for training: the shards are dealt to ``N`` logical workers
(``shards[w::N]``), each worker's part is split over the processes with ``datasets``'
``split_dataset_by_node`` (whole shards when they divide evenly, every ``world_size``-th sample otherwise),
and the loader takes batches from the workers in turn. ``set_epoch(e)`` starts epoch ``e`` over all shards;
with ``shuffle_shards`` the shard order of each epoch is a permutation drawn from ``(seed, epoch)`` alone, so
every process and every resume computes the same one. Its position (the epoch, each worker's ``datasets``
stream state, whose turn it is, the sample-order file's length) is saved into every Accelerate checkpoint as
``stream_state_<rank>.json`` and restored by ``load_state``, so a resumed run consumes the same samples in
the same order as an uninterrupted one, in the epoch it stopped in and in the following ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .data import CaptionDataError, DataReport, normalize_caption
from .image_io import ImageLoadError, load_image

__all__ = [
    "ShardError",
    "ShardStreamLoader",
    "StreamCollator",
    "expand_braces",
    "expand_shards",
    "is_shard_source",
    "iter_shard_rows",
    "build_train_stream",
    "embedding_table",
    "embedding_values",
    "load_shard_captions",
    "stream_report",
    "write_atomically",
    "write_embedding_parquet",
]

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".parquet")
STREAM_STATE_NAME = "stream_state_{rank}.json"
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: the Parquet column each ``mapping_input`` trains from (``clipcap embed`` writes both with ``--patch_tokens``;
#: the training cache the one its model reads); :func:`embedding_table` is the layout of both
EMBEDDING_COLUMNS = {"pooled": "image_embeds", "tokens": "patch_tokens"}
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


class ShardError(CaptionDataError):
    """A shard that is missing or cannot be read; the message names it."""


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar, a-01.tar, a-02.tar`` (zero padding kept); ``{x,y}`` lists too,
    expanded left to right."""
    matches = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if m]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda m: m.start())
    if match.re is _BRACE_RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        parts = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        parts = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for part in parts for name in expand_braces(head + part + tail)]


def is_shard_source(source: Any) -> bool:
    """True for a pattern or path naming ``.tar`` / ``.parquet`` shards (and not an existing folder)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = str(source)
    return any(name.lower().endswith(SHARD_SUFFIXES) for name in expand_braces(text))


def expand_shards(pattern: str) -> list[str]:
    """The shard files of ``pattern``: braces expanded, then globs matched (local or fsspec URL), sorted.

    Names without glob characters are kept as they are even when missing, so that a shard that disappears
    fails when it is read, with its name. A glob that matches nothing is an error here.
    """
    import fsspec

    shards: list[str] = []
    for name in expand_braces(str(pattern)):
        if any(c in name for c in "*?["):
            fs, _, _ = fsspec.get_fs_token_paths(name)
            found = sorted(fs.glob(name))
            if not found:
                raise ShardError(f"{name}: no shard matches this pattern. Check the path.")
            shards += [fs.unstrip_protocol(f) if "://" in name else f for f in found]
        else:
            shards.append(name)
    if not shards:
        raise ShardError(f"{pattern}: no shards.")
    formats = {_shard_format(s) for s in shards}
    if len(formats) != 1:
        raise ShardError(f"{pattern}: mixes {sorted(formats)} shards; use one format per pattern.")
    return shards


def _shard_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    raise ShardError(f"{path}: not a .tar (WebDataset) or .parquet shard.")


# ---------------------------------------------------------------------------------------------- writing


def embedding_table(
    keys: Sequence[str], embeddings: Mapping[str, torch.Tensor], captions: Sequence[str] | None = None
) -> Any:
    """Precomputed image embeddings as the one Parquet layout that ``clipcap embed`` and the training cache write.

    Columns, in this order: ``key`` (string); ``caption`` (string) when ``captions`` are given; then one column
    per ``mapping_input`` in ``embeddings`` (:data:`EMBEDDING_COLUMNS` order): ``image_embeds`` from an (M, D)
    tensor as ``fixed_size_list<float32>[D]``, ``patch_tokens`` from an (M, N, D) tensor as
    ``list<fixed_size_list<float32>[D]>`` (N vectors per row). :func:`embedding_values` reads a column back.
    """
    import pyarrow as pa

    columns: dict[str, Any] = {"key": pa.array([str(k) for k in keys], pa.string())}
    if captions is not None:
        columns["caption"] = pa.array(list(captions), pa.string())
    for mapping_input, name in EMBEDDING_COLUMNS.items():
        if mapping_input not in embeddings:
            continue
        values = embeddings[mapping_input].detach().float().cpu()
        expected = "(M, D)" if mapping_input == "pooled" else "(M, N, D)"
        if values.ndim != len(expected.split(",")) or values.shape[0] != len(keys):
            raise ValueError(
                f"{name}: {len(keys)} keys and a tensor of shape {tuple(values.shape)}; expected {expected}."
            )
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.numpy().reshape(-1)), values.shape[-1])
        if mapping_input == "tokens":  # M rows of N vectors
            offsets = np.arange(values.shape[0] + 1, dtype=np.int32) * values.shape[1]
            vectors = pa.ListArray.from_arrays(pa.array(offsets), vectors)
        columns[name] = vectors
    return pa.table(columns)


def embedding_values(column: Any) -> torch.Tensor:
    """An embedding column of :func:`embedding_table` (or a slice of it) as float32: (M, D) for ``image_embeds``,
    (M, N, D) for ``patch_tokens`` (every row must hold the same N)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    rows, kind = len(column), column.type
    if pa.types.is_fixed_size_list(kind):  # (M, D)
        shape = (rows, kind.list_size)
    elif pa.types.is_list(kind) and pa.types.is_fixed_size_list(kind.value_type):  # (M, N, D)
        column = column.flatten()
        per_row = len(column) // rows if rows else 0
        if per_row * rows != len(column):
            raise ValueError("patch_tokens rows hold different numbers of vectors (one N per file is read).")
        shape = (rows, per_row, kind.value_type.list_size)
    else:
        raise ValueError(f"not an embedding column of embedding_table: {kind}")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return torch.tensor(flat.astype(np.float32, copy=False).reshape(shape))


def write_atomically(target: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write(path)`` into a hidden temporary name beside ``target``, then rename: ``target`` appears complete or
    not at all (the temporary file is removed when writing fails)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_embedding_parquet(
    target: str | os.PathLike, table: Any, *, row_group_rows: int | None = None
) -> None:
    """Write an :func:`embedding_table` to the Parquet file ``target`` atomically (:func:`write_atomically`).

    ``row_group_rows``: rows per Parquet row group (default: pyarrow's, one group for a shard); a reader that
    fetches single rows (the training cache's token features) reads one row group per row, so it asks for small
    ones.
    """
    import pyarrow.parquet as pq

    write_atomically(target, lambda path: pq.write_table(table, path, row_group_size=row_group_rows))


# ---------------------------------------------------------------------------------------------- reading


def _undecoded(stream: datasets.IterableDataset) -> datasets.IterableDataset:
    for name, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image):
            stream = stream.cast_column(name, datasets.Image(decode=False))
    return stream


def _webdataset_row(example: dict[str, Any], shard: str) -> dict[str, Any]:
    key = example["__key__"]
    image = next(
        (example[f] for f in example if f.rsplit(".", 1)[-1].lower() in _IMAGE_EXTENSIONS and example[f]),
        None,
    )
    caption = example.get("txt")
    meta = example.get("json")
    if caption is None and isinstance(meta, dict):
        caption = meta.get("caption")
    row: dict[str, Any] = {"key": key, "shard": shard, "caption": caption}
    if image is None and example.get("image_embeds.npy") is not None:
        row["image_embeds"] = example["image_embeds.npy"]
    else:
        row["image"] = image
    return row


def _parquet_row(example: dict[str, Any], shard: str, index: int, mapping_input: str) -> dict[str, Any]:
    key = example.get("key") or example.get("__key__") or f"{Path(shard).stem}/{index}"
    row: dict[str, Any] = {"key": str(key), "shard": shard, "caption": example.get("caption")}
    column = EMBEDDING_COLUMNS[mapping_input]
    if example.get(column) is not None:
        row["image_embeds"] = example[column]  # (D,) pooled, or (N, D) token features
    elif example.get("image_embeds") is not None:  # pooled only, but the model reads token features
        raise ShardError(
            f"shard {shard} has pooled image_embeds but no {column} column, which mapping_input="
            f"{mapping_input!r} trains from. Re-run `clipcap embed ... --patch_tokens`, or train a pooled model."
        )
    else:
        image = example.get("image")
        row["image"] = {"bytes": image, "path": None} if isinstance(image, (bytes, bytearray)) else image
    return row


def iter_shard_rows(shards: list[str], mapping_input: str = "pooled") -> Iterator[dict[str, Any]]:
    """Rows ``{"key", "shard", "caption", "image" ({"bytes", "path"}) | "image_embeds"}`` of each shard in order.

    A Parquet shard's precomputed ``image_embeds`` come from the column ``mapping_input`` trains from
    (:data:`EMBEDDING_COLUMNS`): ``image_embeds`` (D,) or ``patch_tokens`` (N, D). Each shard is opened with datasets' builder for its format, streamed, images undecoded. Any failure to
    open or read a shard raises :class:`ShardError` naming it.
    """
    for shard in shards:
        fmt = _shard_format(shard)
        index = -1
        try:
            stream = datasets.load_dataset(fmt, data_files={"train": [shard]}, split="train", streaming=True)
            for index, example in enumerate(_undecoded(stream)):
                if fmt == "webdataset":
                    row = _webdataset_row(example, shard)
                else:
                    row = _parquet_row(example, shard, index, mapping_input)
                if isinstance(row.get("image"), dict):  # errors name the shard and the key
                    row["image"] = {"bytes": row["image"].get("bytes"), "path": f"{shard}::{row['key']}"}
                yield row
        except (ShardError, GeneratorExit):
            raise
        except Exception as err:
            where = f" after sample {index}" if index >= 0 else ""
            raise ShardError(
                f"shard {shard} cannot be read{where} ({type(err).__name__}: {err}). Check that it exists "
                "and is a complete WebDataset tar / Parquet file (re-download or remove it from the pattern)."
            ) from err


def _captions(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [normalize_caption(v) for v in values if isinstance(v, str) and normalize_caption(v)]


def load_shard_captions(
    pattern: str, split: str | None = None, mapping_input: str = "pooled"
) -> tuple[datasets.Dataset, DataReport]:
    """All rows of ``pattern`` in memory, in the image-level schema of :mod:`modeling_clipcap.data`.

    Columns: ``image_id`` (the sample key), ``captions`` and ``image`` (``{"bytes", "path"}``, decoded
    later under the run's bad-image policy) or ``image_embeds`` (precomputed). For small sets (validation,
    a few shards); larger ones stream (``--streaming``).
    """
    report = DataReport(source=str(pattern), split=split)
    records: dict[str, dict[str, Any]] = {}
    for row in iter_shard_rows(expand_shards(pattern), mapping_input):
        report.num_rows_read += 1
        captions = _captions(row["caption"])
        if not captions:
            report.empty_captions_dropped += 1
            continue
        record = records.setdefault(row["key"], {"image_id": row["key"], "captions": []})
        for caption in captions:
            if caption in record["captions"]:
                report.duplicate_captions_dropped += 1
            else:
                record["captions"].append(caption)
        if "image_embeds" in row:
            record["image_embeds"] = row["image_embeds"]
        else:
            record["image"] = row["image"]
    rows = list(records.values())
    if not rows:
        raise CaptionDataError(f"{pattern}: no sample with a caption in these shards.")
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    features = {"image_id": datasets.Value("string"), "captions": datasets.List(datasets.Value("string"))}
    if "image" in columns:
        features["image"] = datasets.Image(decode=False)
    if "image_embeds" in columns:
        shape = tuple(np.asarray(columns["image_embeds"][0]).shape)  # (D,) or (N, D)
        features["image_embeds"] = (
            datasets.List(datasets.Value("float32"), length=shape[0])
            if len(shape) == 1
            else datasets.Array2D(shape, "float32")
        )
    report.num_images, report.num_captions = len(rows), sum(len(r["captions"]) for r in rows)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), report


# ---------------------------------------------------------------------------------------------- batching


class StreamCollator:
    """Collate in the loader worker: decode the images, drop or refuse bad ones, tokenize (``collator``).

    Returns ``{"batch": dict | None, "keys": [...], "skipped": [[key, shard, reason]], "state": ...}``:
    ``batch`` is what ``collator`` makes of the good rows (``None`` when none is left), ``keys`` the good
    rows' keys in order, ``state`` the ``datasets`` stream state after the last row.
    """

    def __init__(
        self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], on_bad_image: str = "fail"
    ):
        self.collator = collator
        self.on_bad_image = on_bad_image

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        good, keys, skipped = [], [], []
        for row in rows:
            captions = _captions(row["caption"])
            if not captions:
                skipped.append([row["key"], row["shard"], "no caption"])
                continue
            item: dict[str, Any] = {"caption": captions[0]}
            if row.get("image_embeds") is not None:
                item["image_embeds"] = torch.as_tensor(row["image_embeds"], dtype=torch.float32)
            else:
                try:
                    if row.get("image") is None:
                        raise ImageLoadError("the sample has no image", source=row["key"])
                    item["image"] = load_image(row["image"], name=f"{row['shard']}::{row['key']}")
                except ImageLoadError as err:
                    if self.on_bad_image != "skip":
                        raise ImageLoadError(
                            f"shard {row['shard']}, sample {row['key']!r}: {err} (pass --on_bad_image skip "
                            "to leave bad samples out and list them in train_results.json)",
                            source=row["key"],
                        ) from None
                    skipped.append([row["key"], row["shard"], str(err)])
                    continue
            good.append(item)
            keys.append(row["key"])
        return {
            "batch": self.collator(good) if good else None,
            "keys": keys,
            "skipped": skipped,
            "state": rows[-1]["_state"],
        }


class _WithState(torch.utils.data.IterableDataset):
    """Each row of a ``datasets`` stream with the stream's state after it (``"_state"``)."""

    def __init__(self, stream: datasets.IterableDataset):
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.stream:
            yield row | {"_state": self.stream.state_dict()}


def _rows_of(shards: list[str], mapping_input: str) -> Iterator[dict[str, Any]]:
    yield from iter_shard_rows(shards, mapping_input)


class ShardStreamLoader:
    """Training batches streamed from shards by one process; the same number of batches on every process.

    Args:
        shards: the shard files (:func:`expand_shards`).
        batch_size: rows per batch before bad samples are dropped.
        collate: a :class:`StreamCollator`.
        num_workers: loader worker processes (0: read in this process); at most one per shard.
        rank, world_size: this process and the number of processes.
        device: where batches go.
        any_rank: ``any_rank(flag) -> bool`` over all processes (collective); processes whose part ran out
            get padding batches (labels all -100: no token, no gradient) until every part has run out.
        seed, shuffle_shards: with ``shuffle_shards``, each epoch reads the shards in an order drawn from
            ``(seed, epoch)`` (samples keep their order inside a shard); without it, in the given order.
        sample_order_file: when given, the consumed keys are appended to it, one per line.
        mapping_input: which precomputed Parquet column to train from (:data:`EMBEDDING_COLUMNS`).
    """

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        collate: StreamCollator,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        any_rank: Callable[[bool], bool] | None = None,
        seed: int = 0,
        shuffle_shards: bool = False,
        sample_order_file: str | os.PathLike | None = None,
        mapping_input: str = "pooled",
    ):
        self.shards = list(shards)
        self.mapping_input = mapping_input
        self.batch_size = batch_size
        self.collate = collate
        self.num_workers = num_workers
        self.num_streams = max(1, min(num_workers or 1, len(self.shards)))
        if num_workers > len(self.shards):
            logger.warning(
                "%d loader workers asked for %d shard(s): a worker reads whole shards, so %d are used. Write more, "
                "smaller shards to use more workers.",
                num_workers, len(self.shards), self.num_streams,
            )  # fmt: skip
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.any_rank = any_rank or (lambda flag: flag)
        self.seed, self.shuffle_shards = seed, shuffle_shards
        self.sample_order_file = Path(sample_order_file) if sample_order_file else None
        self.epoch = 0
        self.position: dict[str, Any] | None = None  # restored by load_position
        self.samples_seen = 0
        self.skipped: list[list[str]] = []
        self._template: dict[str, Any] | None = None
        self._order_fh: Any = None

    # -- what each logical worker reads -----------------------------------------------------------
    def _epoch_shards(self, epoch: int) -> list[str]:
        if not self.shuffle_shards:
            return self.shards
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=generator).tolist()]

    def streams(self, epoch: int) -> list[datasets.IterableDataset]:
        """One ``datasets`` stream per logical worker: its shards, split over the processes."""
        from datasets.distributed import split_dataset_by_node

        shards = self._epoch_shards(epoch)
        return [
            split_dataset_by_node(
                datasets.IterableDataset.from_generator(
                    _rows_of,
                    gen_kwargs={"shards": shards[w :: self.num_streams], "mapping_input": self.mapping_input},
                ),
                rank=self.rank,
                world_size=self.world_size,
            )
            for w in range(self.num_streams)
        ]

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch``: every shard again (reshuffled with ``shuffle_shards``), or,
        right after :meth:`load_position` of a checkpoint taken in this epoch, the rest of it."""
        self.epoch = epoch

    # -- position (saved into each checkpoint) ------------------------------------------------------
    def _fresh_position(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "states": [None] * self.num_streams,
            "exhausted": [False] * self.num_streams,
            "next_stream": 0,
        }

    def save_position(self, folder: str | os.PathLike) -> None:
        """Write this process's position into the checkpoint folder (``stream_state_<rank>.json``)."""
        if self._order_fh is not None:
            self._order_fh.flush()
        order_bytes = self.sample_order_file.stat().st_size if self._order_file_exists() else 0
        state = {
            "position": self.position or self._fresh_position(),
            "samples_seen": self.samples_seen,
            "skipped": self.skipped,
            "sample_order_bytes": order_bytes,
            "num_streams": self.num_streams,
            "shards": self.shards,
            "shuffle_shards": self.shuffle_shards,
            "seed": self.seed,
        }
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / STREAM_STATE_NAME.format(rank=self.rank)).write_text(json.dumps(state))

    def load_position(self, folder: str | os.PathLike) -> None:
        """Restore what :meth:`save_position` wrote; the sample-order file is cut back to that point."""
        path = Path(folder) / STREAM_STATE_NAME.format(rank=self.rank)
        if not path.is_file():
            raise CaptionDataError(
                f"{folder} has no {path.name}: it was not written by a streaming run from shards; resume it "
                "with the data options it was written with."
            )
        state = json.loads(path.read_text())
        if state["shards"] != self.shards or state["num_streams"] != self.num_streams:
            raise CaptionDataError(
                f"{path}: written for other shards or another --dataloader_num_workers "
                f"({state['num_streams']} streams); resume with the same data and workers."
            )
        shuffled = state.get("shuffle_shards", False)  # written before the flag existed: not shuffled
        if shuffled != self.shuffle_shards or (shuffled and state.get("seed") != self.seed):
            saved = f"--shuffle_shards {str(shuffled).lower()}" + (
                f" --seed {state.get('seed')}" if shuffled else ""
            )
            raise CaptionDataError(
                f"{path}: written with {saved}, which decides the shard order of every epoch; resume with "
                "the same --shuffle_shards and --seed."
            )
        self.position, self.samples_seen = state["position"], state["samples_seen"]
        self.skipped = state["skipped"]
        if self.sample_order_file is not None:
            self._close_order_file()
            self.sample_order_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.sample_order_file, "a+b") as fh:
                fh.truncate(state["sample_order_bytes"])
            self._order_fh = open(self.sample_order_file, "a")

    def _order_file_exists(self) -> bool:
        return self.sample_order_file is not None and self.sample_order_file.is_file()

    def _close_order_file(self) -> None:
        if self._order_fh is not None:
            self._order_fh.close()
            self._order_fh = None

    def _record(self, keys: list[str]) -> None:
        if self.sample_order_file is None or not keys:
            return
        if self._order_fh is None:  # a fresh run starts the file anew
            self.sample_order_file.parent.mkdir(parents=True, exist_ok=True)
            self._order_fh = open(self.sample_order_file, "w")
        self._order_fh.write("".join(f"{k}\n" for k in keys))
        self._order_fh.flush()  # complete even when the run stops mid-stream (max_train_steps) and keeps the file open

    # -- iteration ----------------------------------------------------------------------------------
    def _loader(self, stream: datasets.IterableDataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            _WithState(stream),
            batch_size=self.batch_size,
            collate_fn=self.collate,
            num_workers=1 if self.num_workers else 0,
            generator=torch.Generator(),  # never draws from the global RNG (exact resume)
        )

    def _padding(self) -> dict[str, Any]:
        if self._template is None:
            raise CaptionDataError(
                f"process {self.rank} got no sample from {len(self.shards)} shard(s): the data has fewer "
                "usable samples than processes. Use fewer processes or more data."
            )
        batch = dict(self._template)
        batch["labels"] = torch.full_like(batch["labels"], -100)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position is None or self.position["epoch"] != self.epoch:
            self.position = self._fresh_position()
        position = self.position
        streams = self.streams(self.epoch)
        iterators: list[Any] = []
        for w, stream in enumerate(streams):
            if position["states"][w] is not None:
                stream.load_state_dict(position["states"][w])
            iterators.append(None if position["exhausted"][w] else iter(self._loader(stream)))
        while True:
            item = None
            while item is None and not all(position["exhausted"]):
                w = position["next_stream"]
                position["next_stream"] = (w + 1) % self.num_streams
                if position["exhausted"][w]:
                    continue
                try:
                    fetched = next(iterators[w])
                except StopIteration:
                    position["exhausted"][w] = True
                    iterators[w] = None
                    continue
                position["states"][w] = fetched["state"]
                self.skipped += fetched["skipped"]
                item = fetched if fetched["batch"] is not None else None
            if self.world_size > 1 and not self.any_rank(item is not None):
                break
            if self.world_size == 1 and item is None:
                break
            if item is None:
                batch = self._padding()
            else:
                batch = self._template = item["batch"]
                self.samples_seen += len(item["keys"])
                self._record(item["keys"])
            yield {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if self._order_fh is not None:
            self._order_fh.flush()

    def report(self) -> dict[str, Any]:
        """This process's counts: ``samples_seen`` and ``skipped`` ``[key, shard, reason]``."""
        return {"samples_seen": self.samples_seen, "skipped": list(self.skipped)}


# ---------------------------------------------------------------------------------------------- training


def build_train_stream(
    accelerator: Any,
    collator: Any,
    *,
    train_file: str | list[str],
    per_device_train_batch_size: int,
    on_bad_image: str,
    dataloader_num_workers: int = 0,
    seed: int = 0,
    shuffle_shards: bool = False,
    output_dir: str | os.PathLike | None = None,
    save_sample_order: bool = False,
    mapping_input: str = "pooled",
) -> ShardStreamLoader:
    """The training loader of ``training/train.py --streaming --train_file <shards>`` for this process.

    The keywords are train.py's flags of the same names; ``save_sample_order`` writes each process's sample keys
    to ``output_dir/sample_order/rank-<r>.txt``. Its position is written into every ``accelerator.save_state``
    folder and read back by ``load_state`` (state hooks), so the Accelerate checkpoint stays the one record of
    where the run is.
    """
    rank = accelerator.process_index
    if save_sample_order and output_dir is None:
        raise ValueError("save_sample_order needs an output_dir to write sample_order/rank-<r>.txt into.")
    order_file = Path(output_dir) / "sample_order" / f"rank-{rank}.txt" if save_sample_order else None

    def any_rank(flag: bool) -> bool:
        return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "sum").item())

    loader = ShardStreamLoader(
        expand_shards(train_file),
        batch_size=per_device_train_batch_size,
        collate=StreamCollator(collator, on_bad_image),
        num_workers=dataloader_num_workers,
        rank=rank,
        world_size=accelerator.num_processes,
        device=accelerator.device,
        any_rank=any_rank,
        seed=seed,
        shuffle_shards=shuffle_shards,
        sample_order_file=order_file,
        mapping_input=mapping_input,
    )
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: loader.save_position(folder))
    accelerator.register_load_state_pre_hook(lambda models, folder: loader.load_position(folder))
    return loader


def stream_report(accelerator: Any, loader: ShardStreamLoader) -> dict[str, Any]:
    """Every process's counts (a collective call): ``samples_seen_per_rank`` and ``skipped_samples``
    (``{"key", "shard", "reason", "rank"}``)."""
    from accelerate.utils import gather_object

    reports = gather_object([loader.report()])
    return {
        "samples_seen_per_rank": [r["samples_seen"] for r in reports],
        "skipped_samples": [
            {"key": key, "shard": shard, "reason": reason, "rank": rank}
            for rank, r in enumerate(reports)
            for key, shard, reason in r["skipped"]
        ],
    }
