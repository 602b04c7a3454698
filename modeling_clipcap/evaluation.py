"""``clipcap evaluate``: caption a data set with a model and score the captions as the field reports them.

:func:`evaluate_model` captions every unique image (through the library's one captioning path,
:func:`modeling_clipcap.captioning.caption_items`) and scores the captions with
:func:`modeling_clipcap.caption_metrics.compute_caption_metrics` (pycocoevalcap) and, given a CLIP model,
:func:`modeling_clipcap.clip_score.compute_clip_score`; training's validation and the command share it.
:func:`render_metrics_table` prints the scores as papers do; :func:`run_evaluation` and :func:`cli_main` are
the command, which writes ``predictions.json``, ``metrics.json``, ``metrics.md`` and, when asked, the model
card's evaluation section (:func:`modeling_clipcap.hub.update_model_card`).

Nothing in this module touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import caption_metrics, clip_score
from .hub import update_model_card

__all__ = [
    "add_cli_arguments",
    "cli_main",
    "evaluate_model",
    "generate_captions",
    "render_metrics_table",
    "run_evaluation",
]

# Names this module held before caption_metrics.py and clip_score.py were split from it, as the docs showed
# them (``from modeling_clipcap.evaluation import compute_caption_metrics``): still importable from here, with a
# FutureWarning naming their module.
_MOVED = {
    "compute_caption_metrics": "caption_metrics",
    "simple_tokenize": "caption_metrics",
    "clip_score_from_embeddings": "clip_score",
    "compute_clip_score": "clip_score",
    "load_clip": "clip_score",
    "ref_clip_score_from_embeddings": "clip_score",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    module = f"modeling_clipcap.{_MOVED[name]}"
    warnings.warn(
        f"modeling_clipcap.evaluation.{name} moved to {module}.{name}: import it from there",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------
# Captioning a dataset and scoring it (shared by `clipcap evaluate` and training's validation)
# ----------------------------------------------------------------------------


def _coco_image_id(image_id: Any) -> Any:
    """COCO results use integer ids: "391895" -> 391895; other ids are kept as they are."""
    if isinstance(image_id, str) and image_id.isdigit() and (image_id == "0" or not image_id.startswith("0")):
        return int(image_id)
    return image_id


def _unique_images(records: Any) -> list[dict[str, Any]]:
    """Image-level rows ``{"image_id", "image", "captions"[, "image_embeds"]}``; repeated ids are merged."""
    merged: dict[Any, dict[str, Any]] = {}
    for i, row in enumerate(records):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"dataset record {i} must be a mapping with image_id, image and captions, got {type(row).__name__}"
            )
        if "image_id" not in row or ("image" not in row and "image_embeds" not in row):
            raise ValueError(
                f"dataset record {i} needs 'image_id' and 'image' (or 'image_embeds'); it has {sorted(row)}. "
                "Read data with modeling_clipcap.data.load_caption_dataset."
            )
        refs = row.get("captions", row.get("caption"))
        refs = [refs] if isinstance(refs, str) else list(refs or [])
        key = _coco_image_id(row["image_id"])
        if key in merged:
            known = merged[key]["captions"]
            known.extend(r for r in refs if r not in known)
            continue
        entry = {"image_id": key, "captions": refs}
        for name in ("image", "image_embeds"):
            if name in row and row[name] is not None:
                entry[name] = row[name]
        merged[key] = entry
    return list(merged.values())


@torch.no_grad()
def generate_captions(
    model: Any,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    on_bad_image: str = "fail",
    progress: bool = True,
    datastore: Any = None,
) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """Caption unique images in batches, through the library's one captioning path
    (:func:`modeling_clipcap.captioning.caption_items`).

    Args:
        model: a ClipCap model (``generate(pixel_values=... | image_embeds=...)`` returning new tokens only).
        processor: its ``ClipCapProcessor`` (images -> ``pixel_values`` (B, 3, H, W); ``batch_decode``).
        records: rows with ``image_id`` and ``image`` (path, ``{"bytes", "path"}`` or PIL image) or
            ``image_embeds`` (D,) precomputed embeddings (then no image is read).
        num_beams, max_new_tokens: decoding settings; None keeps the model's generation config
            (``max_new_tokens`` falls back to 30 when that has none).
        on_bad_image: ``"fail"`` raises on an unreadable image; ``"skip"`` leaves it out and reports it
            (:func:`modeling_clipcap.image_io.check_bad_image_policy`).
        datastore: a ``retrieval.Datastore`` for a retrieval-augmented model (``config.retrieval_k > 0``).

    Returns:
        ``(predictions, skipped)``: ``[{"image_id", "caption"}]`` in record order, and
        ``[(image_id, reason)]`` for images skipped under ``on_bad_image="skip"``.
    """
    from tqdm.auto import tqdm

    from .captioning import caption_items

    kwargs: dict[str, Any] = dict(generation_kwargs or {})
    if num_beams is not None:
        kwargs["num_beams"] = num_beams
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    elif "max_new_tokens" not in kwargs and getattr(model.generation_config, "max_new_tokens", None) is None:
        kwargs["max_new_tokens"] = 30
    predictions: list[dict[str, Any]] = []
    skipped: list[tuple[Any, str]] = []
    with tqdm(total=len(records), desc="captioning", unit="img", disable=not progress) as bar:
        for image_id, captions, error in caption_items(
            model,
            processor,
            records,
            batch_size=batch_size,
            on_bad_image=on_bad_image,
            datastore=datastore,
            **kwargs,
        ):
            bar.update(1)
            if error is not None:
                skipped.append((image_id, error))
                continue
            if len(captions) != 1:
                raise ValueError(
                    f"generate returned {len(captions)} captions for image {image_id!r}; "
                    "evaluation needs num_return_sequences=1"
                )
            predictions.append({"image_id": image_id, "caption": captions[0]})
    return predictions, skipped


def evaluate_model(
    model: Any,
    processor: Any,
    dataset_records: Any,
    *,
    batch_size: int = 16,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    spice: bool | None = False,
    meteor: bool = True,
    clip_model: Any = None,
    clip_processor: Any = None,
    on_bad_image: str = "fail",
    progress: bool = True,
    datastore: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Caption every unique image of a dataset and score the captions against its references.

    The code path of ``clipcap evaluate`` and of training's validation.

    Args:
        model, processor: a ClipCap model and its processor.
        dataset_records: image-level rows ``{"image_id", "image", "captions"}`` (the schema of
            :func:`modeling_clipcap.data.load_caption_dataset`; a ``datasets.Dataset`` or a list of
            dicts). Rows with ``image_embeds`` (D,) are captioned from the embeddings. Repeated ids
            are merged (their references pooled).
        batch_size, num_beams, max_new_tokens, generation_kwargs: decoding (see :func:`generate_captions`).
        spice, meteor: passed to :func:`modeling_clipcap.caption_metrics.compute_caption_metrics`.
        clip_model, clip_processor: optional ``CLIPModel`` + ``CLIPProcessor`` for CLIP-S / RefCLIP-S.
        on_bad_image: ``"fail"`` or ``"skip"`` (skipped images are listed in ``metrics["skipped_images"]``).
        datastore: where a retrieval-augmented model retrieves captions from (``retrieval.Datastore``).

    Returns:
        ``(predictions, metrics)``: ``[{"image_id", "caption"}]`` (the COCO results format) and the
        dict of :func:`~modeling_clipcap.caption_metrics.compute_caption_metrics` (plus ``CLIP-S`` /
        ``RefCLIP-S`` with a CLIP model).
    """
    records = _unique_images(dataset_records)
    if not records:
        raise ValueError("the dataset has no images to caption")
    without_refs = [r["image_id"] for r in records if not r["captions"]]
    if without_refs:
        raise ValueError(f"{len(without_refs)} image(s) have no reference captions, e.g. {without_refs[:3]}")
    predictions, skipped_images = generate_captions(
        model,
        processor,
        records,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        generation_kwargs=generation_kwargs,
        on_bad_image=on_bad_image,
        progress=progress,
        datastore=datastore,
    )
    if not predictions:
        raise ValueError("no image could be read: nothing to score")
    by_id = {r["image_id"]: r for r in records}
    pred_map = {p["image_id"]: p["caption"] for p in predictions}
    refs = {key: by_id[key]["captions"] for key in pred_map}
    metrics = caption_metrics.compute_caption_metrics(pred_map, refs, spice=spice, meteor=meteor)
    if clip_model is not None:
        if clip_processor is None:
            raise ValueError("clip_model needs its clip_processor (a CLIPProcessor)")
        if any("image" not in by_id[key] for key in pred_map):
            metrics["skipped"]["CLIP-S"] = "records carry image embeddings only; CLIPScore needs the images"
        else:
            from .image_io import load_image

            clip = clip_score.compute_clip_score(
                clip_model,
                clip_processor,
                [load_image(by_id[key]["image"]) for key in pred_map],
                list(pred_map.values()),
                [refs[key] for key in pred_map],
                batch_size=batch_size,
            )
            metrics["CLIP-S"] = clip["CLIP-S"]
            metrics["RefCLIP-S"] = clip["RefCLIP-S"]
    if skipped_images:
        metrics["skipped_images"] = [[_json_id(i), reason] for i, reason in skipped_images]
    return predictions, metrics


def _json_id(image_id: Any) -> Any:
    return image_id if isinstance(image_id, (int, str)) else str(image_id)


def _skip_note(reason: str) -> str:
    return reason.replace("|", "\\|").replace("\n", " ")


_OPTIONAL_COLUMNS = {"CLIP-S", "RefCLIP-S"}  # shown only when computed or explicitly skipped


def render_metrics_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """A Markdown table of the scores x100 with two decimals, as papers print them.

    Columns follow :data:`modeling_clipcap.caption_metrics.TABLE_COLUMNS`; a skipped metric shows "–" and its
    reason is listed below the table; CLIP-S / RefCLIP-S appear only when computed or skipped.
    """
    skipped = dict(metrics.get("skipped", {}))
    columns = [
        (key, label)
        for key, label in caption_metrics.TABLE_COLUMNS
        if key not in _OPTIONAL_COLUMNS or key in metrics or key in skipped
    ]
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| " + " | ".join(label for _, label in columns) + " |")
    lines.append("|" + "|".join("---:" for _ in columns) + "|")
    cells = []
    for key, _ in columns:
        value = metrics.get(key)
        cells.append(f"{100 * float(value):.2f}" if value is not None else "–")
    lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if "num_images" in metrics:
        refs = f", {metrics['num_references']} references" if "num_references" in metrics else ""
        notes.append(f"{metrics['num_images']} images{refs}; scores x100 (pycocoevalcap, PTB tokenizer).")
    if metrics.get("tokenizer") == "simple":
        notes.append(
            "Tokenizer: simple fallback (java missing), not the PTB tokenizer: not comparable to papers."
        )
    for key, reason in skipped.items():
        notes.append(f"{key} skipped: {_skip_note(reason)}")
    if notes:
        lines.append("")
        lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# `clipcap evaluate`
# ----------------------------------------------------------------------------


def add_cli_arguments(parser: Any) -> None:
    """Arguments of ``clipcap evaluate`` (see :func:`cli_main`)."""
    from .cli import add_bool_argument
    from .image_io import BAD_IMAGE_POLICIES

    parser.add_argument(
        "--model",
        required=True,
        help="a saved ClipCap model folder (save_pretrained) or a Hugging Face Hub model id",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="captions: Karpathy dataset_coco.json, COCO captions JSON, metadata.jsonl/csv, or a folder with one",
    )
    parser.add_argument("--image_dir", default=None, help="folder the data's image paths are relative to")
    parser.add_argument(
        "--split", default="test", help="split of a Karpathy JSON / data folder (default: test)"
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to write predictions.json, metrics.json, metrics.md (default: outputs/evaluate/<split>)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="images per generate call (default 16)")
    parser.add_argument(
        "--num_beams", type=int, default=None, help="beam size (default: the model's generation config)"
    )
    parser.add_argument(
        "--max_new_tokens", type=int, default=None, help="caption length limit (default: model's, else 30)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N images (quick checks)"
    )
    parser.add_argument(
        "--spice",
        choices=("auto", "on", "off"),
        default="off",
        help="SPICE: off (default; it needs Java <= 11 and the Stanford CoreNLP 3.6.0 jars, which nothing here "
        "downloads), on (an error when it cannot run), auto (computed when it can run, else skipped with why)",
    )
    add_bool_argument(
        parser, "meteor", default=True, help="score METEOR (--no_meteor saves ~10 s of java start-up)"
    )
    parser.add_argument(
        "--clip_model", default=None, help="local CLIPModel folder: also report CLIP-S and RefCLIP-S"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--on_bad_image",
        choices=BAD_IMAGE_POLICIES,
        default="fail",
        help="unreadable images: stop (default) or skip and report them",
    )
    add_bool_argument(
        parser, "update_model_card", help="write the metrics table into the model directory's README.md"
    )
    parser.add_argument(
        "--datastore", default=None, help="retrieval datastore (clipcap index) of a retrieval-augmented model"
    )
    add_bool_argument(parser, "progress", default=True, help="show a progress bar")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_evaluation(args: Any) -> dict[str, Any]:
    """Load model, processor and data from ``args`` (see :func:`add_cli_arguments`), evaluate, write outputs.

    Returns ``{"predictions", "metrics", "output_dir", "files"}``.
    """
    from . import data as data_lib
    from .captioning import load_captioner

    model_dir = Path(args.model)
    if args.update_model_card and not model_dir.is_dir():
        raise ValueError(
            f"--update_model_card writes the table into the model folder's README.md, and --model {args.model} is "
            "not a local folder: download it (huggingface-cli download), or leave the flag out."
        )
    # the one loader (a folder or a Hub id; --device checked before weights are read), in the saved precision
    model, processor = load_captioner(args.model, dtype="auto", device=args.device)
    datastore = None
    if getattr(args, "datastore", None):
        from .retrieval import Datastore

        datastore = Datastore.load(args.datastore)
    device = model.device
    dataset, report = data_lib.load_caption_dataset(
        args.data, split=args.split, image_dir=args.image_dir, on_bad_image=args.on_bad_image
    )
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    clip_model = clip_processor = None
    if args.clip_model:
        clip_model, clip_processor = clip_score.load_clip(args.clip_model, device=device)
    spice = {"auto": None, "on": True, "off": False}[args.spice]
    predictions, metrics = evaluate_model(
        model,
        processor,
        dataset,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        spice=spice,
        meteor=args.meteor,
        clip_model=clip_model,
        clip_processor=clip_processor,
        on_bad_image=args.on_bad_image,
        progress=args.progress,
        datastore=datastore,
    )
    metrics["config"] = {
        "model": str(model_dir),
        "data": str(args.data),
        "split": args.split,
        "image_dir": args.image_dir,
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "clip_model": args.clip_model,
        "datastore": getattr(args, "datastore", None),
    }
    data_report = report.to_dict()
    # One list of every image left out, whether the reader dropped it (missing file) or it failed to decode.
    skipped = [list(item) for item in data_report.pop("skipped_images", None) or []]
    skipped += metrics.pop("skipped_images", None) or []
    metrics["data_report"] = data_report
    if skipped:
        metrics["skipped_images"] = skipped
        metrics["num_skipped_images"] = len(skipped)

    output_dir = Path(args.output_dir) if args.output_dir else Path("outputs") / "evaluate" / str(args.split)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "predictions": output_dir / "predictions.json",
        "metrics": output_dir / "metrics.json",
        "table": output_dir / "metrics.md",
    }
    _write_json(
        files["predictions"],
        [{"image_id": _json_id(p["image_id"]), "caption": p["caption"]} for p in predictions],
    )
    _write_json(files["metrics"], metrics)
    title = f"**{model_dir.name}** on `{Path(args.data).name}` ({args.split})"
    table = render_metrics_table(metrics, title=title)
    files["table"].write_text(table, encoding="utf-8")
    if args.update_model_card:
        files["model_card"] = update_model_card(
            model_dir, table, metrics=metrics, dataset_name=Path(args.data).name, split=args.split
        )
    return {"predictions": predictions, "metrics": metrics, "output_dir": output_dir, "files": files}


def cli_main(args: Any) -> int:
    """Run ``clipcap evaluate``; returns the process exit status (2 for bad input)."""
    import sys

    from .data import CaptionDataError

    try:
        result = run_evaluation(args)
    except (CaptionDataError, FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"clipcap evaluate: error: {err}", file=sys.stderr)
        return 2
    print(render_metrics_table(result["metrics"]))
    if result["metrics"].get("num_skipped_images"):
        print(
            f"bad images skipped: {result['metrics']['num_skipped_images']} "
            f"(listed under skipped_images in {result['files']['metrics']})",
            file=sys.stderr,
        )
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0
