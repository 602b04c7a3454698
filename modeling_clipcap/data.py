"""Caption data sets for training and ``clipcap evaluate``: readers, validation, tokenization.

Sources (:func:`load_caption_dataset` picks the reader from the path):

* **Karpathy-style COCO JSON** (``dataset_coco.json``): ``{"images": [{"filepath", "filename",
  "cocoid", "split", "sentences": [{"raw", "tokens"}]}]}``. Image files are
  ``image_dir / filepath / filename`` (``image_dir`` defaults to the JSON's folder). ``split``
  selects ``"train" | "restval" | "val" | "test"`` (``"validation"`` means ``"val"``; any other
  split string stored in the file works too); ``"train"`` includes ``"restval"`` unless
  ``train_includes_restval=False``. ``image_id`` is ``cocoid`` (else ``image_id``, ``imgid``,
  the file path).
* **Official COCO captions JSON** (``captions_val2014.json``): ``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}``.
* **Image folder + metadata** (the ``datasets`` ``imagefolder`` convention): a
  ``metadata.jsonl`` / ``metadata.csv`` (or any ``.jsonl`` / ``.csv`` / JSON list file) whose rows
  have ``file_name`` and ``caption`` (one string) or ``captions`` (a list; in CSV a JSON list
  string). Rows with the same ``file_name`` are merged. ``file_name`` is relative to
  ``image_dir`` (default: the metadata file's folder) and must stay inside it: absolute paths
  and ``..`` that leave the folder are refused (always an error, whatever the policy). Other
  columns (e.g. ``num_objects``) are kept, taken from an image's first row. A folder holding
  such a file, or ``<folder>/<split>/metadata.jsonl``, can be passed instead of the file.
* **Any ``datasets`` dataset** with an image column and a text column (str or list of str):
  a ``save_to_disk`` folder, a local folder / script that ``datasets.load_dataset`` reads, or a
  Hub name (needs network). Rows are images unless ``image_id_column`` groups them.

Output schema (image level; one row per unique image, all its references)
-------------------------------------------------------------------------
========== ================================================================================
column     type
========== ================================================================================
image_id   ``string``: unique per image (Karpathy: the cocoid; folders: the relative path)
image      ``string``: absolute image file path (file sources and path-valued ``datasets``
           columns), or ``datasets.Image(decode=False)``, i.e. ``{"bytes", "path"}`` dicts, for
           ``datasets`` image columns. Open either with :func:`load_example_image`, which goes
           through :func:`modeling_clipcap.image_io.load_image` (safe decoding, RGB).
captions   ``list<string>``: non-empty references, whitespace collapsed, de-duplicated, in order
(extra)    metadata columns of folder sources, e.g. ``num_objects``, ``objects``
========== ================================================================================

:func:`explode_captions` turns it into one row per (image, caption) for training: the same
columns with ``caption`` (``string``) instead of ``captions``.

Cleaning, all counted in the :class:`DataReport` returned with the data: captions are stripped
and runs of whitespace become one space; empty/whitespace-only captions are dropped; a caption
repeated for the same image is dropped; images left without captions are dropped. Missing or
empty image files: with ``on_bad_image="fail"`` (default) a :class:`CaptionDataError` lists them
with their count; with ``"skip"`` they are dropped and listed in ``report.skipped_images`` with
reasons. ``verify_images=True`` also decodes every image (slow, catches corrupt files up front);
otherwise corrupt files surface when the images are read (embedding cache, evaluation), under the
same policy there. Malformed JSON / JSONL / CSV and non-UTF-8 text raise
:class:`CaptionDataError` naming the file and the line.

Tokenization (:class:`CaptionCollator`)
---------------------------------------
Captions are tokenized as they are, without a leading space, like the original ClipCap (GPT-2
sees "a man ..." with "a" as a word-initial token at the start of the text), and the tokenizer's
eos token is appended. Captions longer than ``max_caption_length`` tokens (eos included) are cut
to ``max_caption_length - 1`` tokens plus eos; :func:`count_truncated_captions` counts them for
the report. Batches are padded to their longest caption; padded positions have
``attention_mask`` 0 and ``labels`` -100.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import stat
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .image_io import DEFAULT_MAX_PIXELS, ImageLoadError, check_bad_image_policy, load_image

__all__ = [
    "CaptionCollator",
    "CaptionDataError",
    "DataReport",
    "count_truncated_captions",
    "explode_captions",
    "load_caption_dataset",
    "load_caption_file",
    "load_coco_json",
    "load_example_image",
    "load_hf_caption_dataset",
    "load_karpathy_json",
    "normalize_caption",
]

_MAX_LISTED = 20  # bad files named in one error message


class CaptionDataError(ValueError):
    """A caption data file or its images are unusable. The message names the file (and line)."""


@dataclass
class DataReport:
    """What a reader did to the data; print :meth:`summary` in a training or evaluation run."""

    source: str
    split: str | None = None
    num_rows_read: int = 0
    num_images: int = 0
    num_captions: int = 0
    empty_captions_dropped: int = 0
    duplicate_captions_dropped: int = 0
    images_without_captions_dropped: int = 0
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    truncated_captions: int = 0
    max_caption_length: int | None = None

    def summary(self) -> str:
        """A few lines for logs, e.g. ``"data: 5000 images, 25010 captions from ..."``."""
        split = f" [{self.split}]" if self.split else ""
        lines = [
            f"data{split}: {self.num_images} images, {self.num_captions} captions from {self.source} "
            f"({self.num_rows_read} rows read)"
        ]
        for label, count in (
            ("empty/whitespace captions dropped", self.empty_captions_dropped),
            ("duplicate captions dropped", self.duplicate_captions_dropped),
            ("images without any caption dropped", self.images_without_captions_dropped),
        ):
            if count:
                lines.append(f"  {label}: {count}")
        if self.truncated_captions:
            lines.append(
                f"  captions truncated to {self.max_caption_length} tokens: {self.truncated_captions}"
            )
        if self.skipped_images:
            lines.append(f"  images skipped (on_bad_image='skip'): {len(self.skipped_images)}")
            lines.extend(f"    {name}: {reason}" for name, reason in self.skipped_images[:_MAX_LISTED])
            if len(self.skipped_images) > _MAX_LISTED:
                lines.append(f"    ... and {len(self.skipped_images) - _MAX_LISTED} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for ``metrics.json`` / run logs)."""
        out = asdict(self)
        out["skipped_images"] = [list(item) for item in self.skipped_images]
        return out


# ------------------------------------------------------------------------------------------ helpers

_WS = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Strip and collapse whitespace runs to one space (``""`` for whitespace-only text)."""
    return _WS.sub(" ", text).strip()


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a BOM is accepted); clear errors for missing / non-UTF-8 files."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise CaptionDataError(f"caption file {path} does not exist. Check the path.") from err
    except IsADirectoryError as err:
        raise CaptionDataError(f"{path} is a folder, expected a caption file.") from err
    except OSError as err:
        raise CaptionDataError(f"cannot read caption file {path}: {err}.") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CaptionDataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}). "
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from err


def _member_path(root: Path, file_name: Any, where: str) -> tuple[str, str]:
    """``(normalized relative posix name, absolute path string)`` of ``file_name`` inside ``root``.

    Refuses absolute paths and ``..`` that leave ``root`` (lexically; symlinks are not followed).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise CaptionDataError(f"{where}: file_name must be a non-empty string, got {file_name!r}.")
    name = file_name.strip().replace("\\", "/") if os.sep == "\\" else file_name.strip()
    if name.startswith("/") or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        raise CaptionDataError(
            f"{where}: file_name {file_name!r} is an absolute path; it must be relative to the image folder "
            f"{root}. Refused: metadata may not point outside its image folder."
        )
    rel = posixpath.normpath(name)
    if rel == ".." or rel.startswith("../") or rel == ".":
        raise CaptionDataError(
            f"{where}: file_name {file_name!r} escapes the image folder {root}. "
            "Refused: metadata may not point outside its image folder."
        )
    return rel, os.path.join(os.path.abspath(root), rel)


class _Builder:
    """Accumulates rows into image-level records with cleaning and counting."""

    def __init__(self, report: DataReport):
        self.report = report
        self.records: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, set[str]] = {}
        self.extra_keys: list[str] = []

    def add(
        self,
        image_id: str,
        image: str,
        captions: Iterable[Any],
        where: str,
        extras: Mapping[str, Any] | None = None,
    ):
        rec = self.records.get(image_id)
        if rec is None:
            rec = {"image_id": image_id, "image": image, "captions": []}
            if extras:
                for key, value in extras.items():
                    if key not in self.extra_keys:
                        self.extra_keys.append(key)
                    rec[key] = value
            self.records[image_id] = rec
            self.seen[image_id] = set()
        seen = self.seen[image_id]
        for caption in captions:
            if caption is None:
                caption = ""
            if not isinstance(caption, str):
                raise CaptionDataError(
                    f"{where}: a caption must be text, got {type(caption).__name__} {caption!r}."
                )
            text = normalize_caption(caption)
            if not text:
                self.report.empty_captions_dropped += 1
            elif text in seen:
                self.report.duplicate_captions_dropped += 1
            else:
                seen.add(text)
                rec["captions"].append(text)

    def finish(self, on_bad_image: str, verify_images: bool, max_pixels: int | None) -> datasets.Dataset:
        rows = []
        for rec in self.records.values():
            if rec["captions"]:
                rows.append(rec)
            else:
                self.report.images_without_captions_dropped += 1
        rows = _filter_bad_images(
            rows, lambda r: r["image"], self.report, on_bad_image, verify_images, max_pixels
        )
        self.report.num_images = len(rows)
        self.report.num_captions = sum(len(r["captions"]) for r in rows)
        base = {
            "image_id": datasets.Value("string"),
            "image": datasets.Value("string"),
            "captions": datasets.List(datasets.Value("string")),
        }
        columns: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in base}
        if self.extra_keys:
            extra = {k: [r.get(k) for r in rows] for k in self.extra_keys if k not in base}
            try:
                typed = datasets.Dataset.from_dict({**columns, **extra})
                return typed.cast(datasets.Features({**base, **{k: typed.features[k] for k in extra}}))
            except Exception as err:  # mixed types in an extra column: keep the essential ones
                warnings.warn(
                    f"{self.report.source}: extra columns {sorted(extra)} could not be stored ({err}); dropped them.",
                    stacklevel=3,
                )
        return datasets.Dataset.from_dict(columns, features=datasets.Features(base))


def _image_problem(path: str, verify: bool, max_pixels: int | None) -> str | None:
    """Why an image file is unusable, or ``None``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file does not exist"
    except OSError as err:
        return f"cannot access file ({err})"
    if not stat.S_ISREG(st.st_mode):
        return "not a file"
    if st.st_size == 0:
        return "file is empty (0 bytes)"
    if verify:
        try:
            load_image(path, max_pixels=max_pixels)
        except ImageLoadError as err:
            return str(err)
    return None


def _filter_bad_images(rows, get_path, report: DataReport, on_bad_image: str, verify: bool, max_pixels):
    on_bad_image = check_bad_image_policy(on_bad_image)
    bad: list[tuple[str, str]] = []
    good = []
    iterator = rows
    if verify and len(rows) > 200:
        from tqdm.auto import tqdm

        iterator = tqdm(rows, desc="verifying images", unit="img")
    for row in iterator:
        path = get_path(row)
        problem = _image_problem(path, verify, max_pixels) if isinstance(path, str) else None
        if problem is None:
            good.append(row)
        else:
            bad.append((path, problem))
    if bad and on_bad_image == "fail":
        listed = "\n".join(f"  {name}: {reason}" for name, reason in bad[:_MAX_LISTED])
        more = f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise CaptionDataError(
            f"{report.source}: {len(bad)} of {len(rows)} images are missing or unreadable:\n{listed}{more}\n"
            "Fix the paths (image folder option) or pass on_bad_image='skip' (--on_bad_image skip) "
            "to drop them and list them in the report."
        )
    report.skipped_images.extend(bad)
    return good


# ------------------------------------------------------------------------------------------ readers


def _select_split(value: Any, split: str | None, train_includes_restval: bool) -> bool:
    if split is None:
        return True
    wanted = {"validation": "val", "valid": "val", "dev": "val"}.get(split, split)
    accepted = {wanted}
    if wanted == "train" and train_includes_restval:
        accepted.add("restval")
    return value in accepted


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CaptionDataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}. Fix or re-export the file."
        ) from err


def load_karpathy_json(
    path: str | os.PathLike,
    split: str | None = "test",
    image_dir: str | os.PathLike | None = None,
    *,
    train_includes_restval: bool = True,
    on_bad_image: str = "fail",
    verify_images: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    _data: Any = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Read a Karpathy-style COCO JSON (see the module docstring). ``split=None`` reads all images."""
    path = Path(path)
    data = _data if _data is not None else _parse_json(path, _read_text(path))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionDataError(f"{path}: expected a Karpathy-style JSON object with an 'images' list.")
    root = Path(image_dir) if image_dir is not None else path.parent
    report = DataReport(source=str(path), split=split)
    builder = _Builder(report)
    splits_seen: set[str] = set()
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if (
            not isinstance(entry, dict)
            or "filename" not in entry
            or not isinstance(entry.get("sentences"), list)
        ):
            raise CaptionDataError(f"{where}: expected an object with 'filename' and a 'sentences' list.")
        splits_seen.add(str(entry.get("split")))
        if not _select_split(entry.get("split"), split, train_includes_restval):
            continue
        report.num_rows_read += 1
        folder = entry.get("filepath") or ""
        rel, abs_path = _member_path(root, posixpath.join(str(folder), str(entry["filename"])), where)
        image_id = next(
            (str(entry[k]) for k in ("cocoid", "image_id", "imgid") if entry.get(k) is not None), rel
        )
        captions = []
        for sent in entry["sentences"]:
            if isinstance(sent, dict):
                raw = sent.get("raw")
                if raw is None and isinstance(sent.get("tokens"), list):
                    raw = " ".join(map(str, sent["tokens"]))
                captions.append(raw)
            else:
                captions.append(sent)
        builder.add(image_id, str(abs_path), captions, where)
    if report.num_rows_read == 0:
        raise CaptionDataError(
            f"{path}: no images in split {split!r}; the file has splits {sorted(splits_seen)}."
        )
    return builder.finish(on_bad_image, verify_images, max_pixels), report


def load_coco_json(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    on_bad_image: str = "fail",
    verify_images: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    _data: Any = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Read an official COCO captions JSON (``images`` + ``annotations``)."""
    path = Path(path)
    data = _data if _data is not None else _parse_json(path, _read_text(path))
    root = Path(image_dir) if image_dir is not None else path.parent
    report = DataReport(source=str(path))
    builder = _Builder(report)
    files: dict[Any, tuple[str, str]] = {}
    for i, im in enumerate(data.get("images", [])):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise CaptionDataError(f"{where}: expected an object with 'id' and 'file_name'.")
        files[im["id"]] = _member_path(root, im["file_name"], where)[1], str(im["id"])
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            raise CaptionDataError(f"{where}: 'image_id' missing or not listed under 'images'.")
        report.num_rows_read += 1
        image_path, image_id = files[ann["image_id"]]
        builder.add(image_id, image_path, [ann.get("caption")], where)
    return builder.finish(on_bad_image, verify_images, max_pixels), report


def _iter_metadata_rows(path: Path, text: str, kind: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """``(where, row)`` pairs of a JSON Lines / CSV / JSON-list file, with line numbers in ``where``."""
    if kind == "jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CaptionDataError(
                    f"{path}: line {lineno}: malformed JSON ({err.msg} at column {err.colno}). "
                    "Each line must be one JSON object."
                ) from err
            if not isinstance(row, dict):
                raise CaptionDataError(
                    f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}."
                )
            yield f"{path}: line {lineno}", row
    elif kind == "json":
        data = _parse_json(path, text)
        if not isinstance(data, list):
            raise CaptionDataError(f"{path}: expected a JSON list of {{'file_name', 'caption'}} objects.")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise CaptionDataError(f"{path}: item {i}: expected a JSON object.")
            yield f"{path}: item {i}", row
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise CaptionDataError(f"{path}: line 1: malformed CSV header ({err}).") from err
        header = [h.strip() for h in header]
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise CaptionDataError(f"{path}: line {reader.line_num}: malformed CSV ({err}).") from err
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise CaptionDataError(
                    f"{path}: line {reader.line_num}: {len(values)} fields, but the header has {len(header)} "
                    f"({', '.join(header)}). Quote fields that contain commas."
                )
            yield f"{path}: line {reader.line_num}", dict(zip(header, values))


def load_caption_file(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    image_column: str = "file_name",
    caption_column: str | None = None,
    on_bad_image: str = "fail",
    verify_images: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[datasets.Dataset, DataReport]:
    """Read a ``metadata.jsonl`` / ``.csv`` / JSON-list file beside an image folder.

    Args:
        path: the metadata file.
        image_dir: the folder ``file_name`` is relative to (default: the file's folder).
        image_column: the column holding the relative image path.
        caption_column: the caption column; default ``"captions"`` (a list) or ``"caption"``.
    """
    path = Path(path)
    kind = {".jsonl": "jsonl", ".csv": "csv", ".json": "json"}.get(path.suffix.lower())
    if kind is None:
        raise CaptionDataError(f"{path}: unknown caption file type; use .jsonl, .csv or .json.")
    root = Path(image_dir) if image_dir is not None else path.parent
    text = _read_text(path)
    if kind == "json" and text.lstrip().startswith("{"):  # a JSON object: Karpathy or COCO format
        return load_caption_dataset(
            path,
            image_dir=image_dir,
            on_bad_image=on_bad_image,
            verify_images=verify_images,
            max_pixels=max_pixels,
        )
    report = DataReport(source=str(path))
    builder = _Builder(report)
    for where, row in _iter_metadata_rows(path, text, kind):
        if report.num_rows_read == 0:
            missing = [c for c in (image_column,) if c not in row]
            if missing:
                raise CaptionDataError(
                    f"{where}: no {image_column!r} column (found {sorted(row)}). "
                    "Metadata rows need the image's relative path in 'file_name'."
                )
        report.num_rows_read += 1
        column = caption_column or ("captions" if "captions" in row else "caption")
        if column not in row:
            raise CaptionDataError(
                f"{where}: no {column!r} column (found {sorted(row)}); need 'caption' or 'captions'."
            )
        value = row[column]
        if kind == "csv" and column == "captions" and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise CaptionDataError(f"{where}: 'captions' is not a valid JSON list ({err.msg}).") from err
        captions = value if isinstance(value, list) else [value]
        rel, abs_path = _member_path(root, row.get(image_column), where)
        extras = {k: v for k, v in row.items() if k not in (image_column, column, "caption", "captions")}
        builder.add(rel, str(abs_path), captions, where, extras)
    if report.num_rows_read == 0:
        raise CaptionDataError(f"{path}: the file has no rows.")
    return builder.finish(on_bad_image, verify_images, max_pixels), report


def load_hf_caption_dataset(
    name_or_path: str | os.PathLike,
    split: str | None = None,
    *,
    config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    image_id_column: str | None = None,
    on_bad_image: str = "fail",
    verify_images: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    dataset: datasets.Dataset | datasets.DatasetDict | None = None,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Read any ``datasets`` dataset with an image and a caption column (see the module docstring).

    ``dataset`` may be passed directly instead of loading ``name_or_path``.
    """
    source = str(name_or_path)
    ds = dataset
    if ds is None:
        local = Path(name_or_path)
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(source, config_name, split=split, cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise CaptionDataError(f"{source}: choose a split with split=...; available: {sorted(ds)}.")
        ds = ds[split]
    if not isinstance(ds, datasets.Dataset):
        raise CaptionDataError(
            f"{source}: expected a datasets.Dataset, got {type(ds).__name__} (streaming is not read here)."
        )
    for col, label in (
        (image_column, "image_column"),
        (caption_column, "caption_column"),
        (image_id_column, "image_id_column"),
    ):
        if col is not None and col not in ds.column_names:
            raise CaptionDataError(f"{source}: no column {col!r} ({label}); columns are {ds.column_names}.")
    report = DataReport(source=source, split=split, num_rows_read=ds.num_rows)
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise CaptionDataError(
            f"{source}: column {image_column!r} is {feature}, expected images or file paths."
        )
    ids = [str(v) for v in ds[image_id_column]] if image_id_column else [str(i) for i in range(ds.num_rows)]
    builder = _Builder(report)
    first_row: dict[str, int] = {}
    for i, value in enumerate(ds[caption_column]):
        captions = value if isinstance(value, list) else [value]
        first_row.setdefault(ids[i], i)
        builder.add(ids[i], "", captions, f"{source}: row {i}")
    keep: list[int] = []
    for image_id, rec in builder.records.items():
        if rec["captions"]:
            keep.append(first_row[image_id])
        else:
            report.images_without_captions_dropped += 1
    images = ds.select_columns([image_column])
    if keep != list(range(ds.num_rows)):  # select only when rows are dropped (it copies on flatten)
        images = images.select(keep)
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    if verify_images or not isinstance(feature, datasets.Image):  # paths are always checked (cheap)
        rows = [{"i": n, "image": v} for n, v in enumerate(images["image"])]
        checked = _filter_hf_images(rows, report, on_bad_image, verify_images, max_pixels)
        if len(checked) != len(rows):
            good = [r["i"] for r in checked]
            images = images.select(good)
            keep = [keep[n] for n in good]
    kept_ids = [ids[k] for k in keep]
    captions = [builder.records[i]["captions"] for i in kept_ids]
    meta = datasets.Dataset.from_dict(
        {"image_id": kept_ids, "captions": captions},
        features=datasets.Features(
            {"image_id": datasets.Value("string"), "captions": datasets.List(datasets.Value("string"))}
        ),
    )
    out = datasets.concatenate_datasets(
        [
            meta.select_columns(["image_id"]),
            images,  # concatenate_datasets flattens an indices mapping itself
            meta.select_columns(["captions"]),
        ],
        axis=1,
    )
    report.num_images = out.num_rows
    report.num_captions = sum(len(c) for c in captions)
    return out, report


def _filter_hf_images(rows, report: DataReport, on_bad_image: str, verify: bool, max_pixels) -> list[dict]:
    on_bad_image = check_bad_image_policy(on_bad_image)
    bad, good = [], []
    for row in rows:
        value = row["image"]
        if isinstance(value, str):
            problem = _image_problem(value, verify, max_pixels)
            name = value
        else:
            name = (value or {}).get("path") or f"row {row['i']}"
            problem = None
            if verify:
                try:
                    load_image(value, max_pixels=max_pixels, name=name)
                except ImageLoadError as err:
                    problem = str(err)
        (good if problem is None else bad).append(row if problem is None else (name, problem))
    if bad and on_bad_image == "fail":
        listed = "\n".join(f"  {n}: {r}" for n, r in bad[:_MAX_LISTED])
        raise CaptionDataError(
            f"{report.source}: {len(bad)} of {len(rows)} images are missing or unreadable:\n{listed}\n"
            "Fix them or pass on_bad_image='skip'."
        )
    report.skipped_images.extend(bad)
    return good


def load_caption_dataset(
    source: str | os.PathLike,
    split: str | None = None,
    *,
    image_dir: str | os.PathLike | None = None,
    config_name: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_id_column: str | None = None,
    train_includes_restval: bool = True,
    on_bad_image: str = "fail",
    verify_images: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Read captions from any supported source into the image-level schema of this module.

    Dispatch: a ``.json`` object file -> Karpathy (``"images"`` with ``"sentences"``; ``split``
    defaults to ``"test"``) or COCO
    (``"annotations"``) format; ``.jsonl`` / ``.csv`` / JSON list -> :func:`load_caption_file`;
    a folder with ``metadata.jsonl|csv`` (or ``<split>/metadata.jsonl|csv``) -> the same; a
    ``save_to_disk`` folder or anything else -> :func:`load_hf_caption_dataset` (``cache_dir`` is
    passed to ``datasets.load_dataset``).

    Returns:
        ``(dataset, report)``: the image-level ``datasets.Dataset`` and a :class:`DataReport`.
    """
    on_bad_image = check_bad_image_policy(on_bad_image)
    common = {"on_bad_image": on_bad_image, "verify_images": verify_images, "max_pixels": max_pixels}
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() == ".json":
            text = _read_text(path)
            data = _parse_json(path, text)
            if isinstance(data, dict) and "annotations" in data:
                return load_coco_json(path, image_dir, _data=data, **common)
            if isinstance(data, dict):
                karpathy_split = split if split is not None else "test"
                return load_karpathy_json(
                    path,
                    karpathy_split,
                    image_dir,
                    train_includes_restval=train_includes_restval,
                    _data=data,
                    **common,
                )
        return load_caption_file(
            path, image_dir, image_column=image_column or "file_name", caption_column=caption_column, **common
        )
    if path.is_dir():
        for folder in ([path / split] if split else []) + [path]:
            for name in ("metadata.jsonl", "metadata.csv"):
                if (folder / name).is_file():
                    return load_caption_file(
                        folder / name,
                        image_dir,
                        image_column=image_column or "file_name",
                        caption_column=caption_column,
                        **common,
                    )
    elif _looks_local(str(source)):
        raise CaptionDataError(
            f"{source} does not exist (neither a caption file, a folder nor a dataset name)."
        )
    return load_hf_caption_dataset(
        source,
        split,
        config_name=config_name,
        image_column=image_column or "image",
        caption_column=caption_column or "caption",
        image_id_column=image_id_column,
        cache_dir=cache_dir,
        **common,
    )


def _looks_local(source: str) -> bool:
    """True for strings that are meant as local paths rather than Hub dataset names."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or Path(source).suffix.lower() in (".json", ".jsonl", ".csv", ".arrow", ".parquet")
        or source.count("/") > 1
    )


def load_example_image(value: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Open the ``image`` value of a row (path string, ``{"bytes", "path"}`` dict or PIL image) as RGB.

    Raises:
        ImageLoadError: the image is missing or unreadable (the message names it).
    """
    return load_image(value, max_pixels=max_pixels)


# ------------------------------------------------------------------------------------------ training


def explode_captions(dataset: datasets.Dataset) -> datasets.Dataset:
    """One row per (image, caption): the image-level columns with ``caption`` instead of ``captions``.

    Rows of one image stay together in caption order; other columns (``image``, cached
    ``image_embeds``, ...) are repeated. Done with one Arrow ``take`` (fast: 90k captions of 20k
    images in well under a second); the result lives in memory, so for very large cached
    embedding columns consider exploding indices instead and looking the embeddings up.
    """
    import pyarrow.compute as pc

    if "captions" not in dataset.column_names:
        raise ValueError(f"explode_captions needs a 'captions' column; columns are {dataset.column_names}.")
    table = dataset.with_format("arrow")[:]
    captions = table.column("captions")
    parents = pc.list_parent_indices(captions)
    flat = pc.list_flatten(captions)
    exploded = table.drop_columns(["captions"]).take(parents).append_column("caption", flat.cast("string"))
    features = datasets.Features({k: v for k, v in dataset.features.items() if k != "captions"})
    features["caption"] = datasets.Value("string")
    return datasets.Dataset(exploded, info=datasets.DatasetInfo(features=features))


def count_truncated_captions(
    captions: Iterable[str] | datasets.Dataset,
    tokenizer: Any,
    max_caption_length: int,
    batch_size: int = 1000,
) -> int:
    """How many captions exceed ``max_caption_length`` tokens once the eos token is appended.

    ``captions`` is a list of strings, or a dataset with a ``caption`` or ``captions`` column.
    """
    if isinstance(captions, datasets.Dataset):
        if "caption" in captions.column_names:
            captions = captions["caption"]
        else:
            captions = [c for caps in captions["captions"] for c in caps]
    captions = list(captions)
    count = 0
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(captions[start : start + batch_size], add_special_tokens=False)["input_ids"]
        count += sum(1 for x in ids if len(x) + 1 > max_caption_length)
    return count


class CaptionCollator:
    """Tokenize captions and build a training batch (dynamic padding).

    Each feature (row) needs ``caption`` (str) and one of ``image_embeds`` (``(D,)``),
    ``pixel_values`` (``(3, H, W)``), or ``image`` (path / bytes dict / PIL) when an
    ``image_processor`` is given.

    Returns (``B`` rows, ``T`` = longest caption in the batch incl. eos, at most
    ``max_caption_length``):

    * ``input_ids`` ``(B, T)`` long: caption tokens + eos, right-padded with the pad id
      (the eos id when the tokenizer has no pad token);
    * ``attention_mask`` ``(B, T)`` long: 1 on caption tokens and eos, 0 on padding;
    * ``labels`` ``(B, T)`` long: ``input_ids`` with padding set to -100;
    * with a ``prompt`` (str) per row (retrieval augmentation): its tokens come before the caption's in
      ``input_ids`` / ``attention_mask`` and are -100 in ``labels``;
    * ``image_embeds`` ``(B, D)`` float, or ``pixel_values`` ``(B, 3, H, W)`` float (from ``image``: every
      tensor the image processor returns, e.g. SigLIP2's ``pixel_attention_mask`` ``(B, N)`` and
      ``spatial_shapes`` ``(B, 2)`` too).

    ``num_truncated`` counts captions cut so far (in this process / worker).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_caption_length: int | None = None,
        *,
        image_processor: Any = None,
        caption_column: str = "caption",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos token; set tokenizer.eos_token (GPT-2: '<|endoftext|>')."
            )
        if max_caption_length is not None and max_caption_length < 2:
            raise ValueError(f"max_caption_length must be >= 2 (one token + eos), got {max_caption_length}.")
        self.tokenizer = tokenizer
        self.max_caption_length = max_caption_length
        self.image_processor = image_processor
        self.caption_column = caption_column
        self.max_pixels = max_pixels
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.num_truncated = 0

    def tokenize(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption, eos appended, cut to ``max_caption_length``."""
        for c in captions:
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"every caption must be non-empty text, got {c!r}.")
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        out = []
        for ids in encoded:
            ids = list(ids)
            if self.max_caption_length is not None and len(ids) + 1 > self.max_caption_length:
                ids = ids[: self.max_caption_length - 1]
                self.num_truncated += 1
            out.append(ids + [self.eos_id])
        return out

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if len(features) == 0:
            raise ValueError("CaptionCollator got an empty batch.")
        ids = self.tokenize([f[self.caption_column] for f in features])
        # a retrieval-augmented model's rows carry their text prompt (retrieved captions): it comes first and is
        # not predicted (labels -100)
        prompts = [[] for _ in ids]
        if "prompt" in features[0]:
            prompts = [
                list(p)
                for p in self.tokenizer([f["prompt"] for f in features], add_special_tokens=False)[
                    "input_ids"
                ]
            ]
        length = max(len(p) + len(x) for p, x in zip(prompts, ids))
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        labels = torch.full((len(ids), length), -100, dtype=torch.long)
        for row, (p, x) in enumerate(zip(prompts, ids)):
            input_ids[row, : len(p) + len(x)] = torch.tensor(p + x, dtype=torch.long)
            attention_mask[row, : len(p) + len(x)] = 1
            labels[row, len(p) : len(p) + len(x)] = torch.tensor(x, dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        first = features[0]
        if "image_embeds" in first:
            batch["image_embeds"] = _stack([f["image_embeds"] for f in features], "image_embeds")
        elif "pixel_values" in first:
            batch["pixel_values"] = _stack([f["pixel_values"] for f in features], "pixel_values")
        elif self.image_processor is not None and "image" in first:
            images = [load_image(f["image"], max_pixels=self.max_pixels) for f in features]
            # every tensor the tower needs: pixel_values, and SigLIP2's pixel_attention_mask / spatial_shapes
            batch.update(self.image_processor(images=images, return_tensors="pt"))
        return batch


def _stack(values: list[Any], name: str):
    import torch

    tensors = [torch.as_tensor(v) for v in values]
    if not tensors[0].is_floating_point():
        tensors = [t.float() for t in tensors]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"{name} of one batch have different shapes {sorted(shapes)}.")
    return torch.stack(tensors)
