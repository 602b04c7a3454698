"""``clipcap app``: a Gradio page and a small HTTP captioning service around a ClipCap model.

Install the optional extra and start it on a saved model folder or a Hub model id::

    pip install -e ".[app]"
    clipcap app --model path/or/org/clipcap-coco [--clip_model DIR_OR_HUB_ID] [--examples DIR]
                [--host 127.0.0.1] [--port 7860] [--share]

The page takes one image or many (or an example), lets the visitor choose the decoding (greedy, beam
search, sampling; how many captions; maximum length; defaults from the model's generation config),
and shows each caption with the prefix read back as its nearest vocabulary tokens (paper, section
4.7) and, with ``--clip_model``, the CLIPScore of every caption with the captions re-ranked by it.
The results of a batch download as JSON and CSV.

The same server is an API: the endpoint ``caption`` takes one image file and returns its caption
(``gradio_client.Client(url).predict(handle_file("a.jpg"), api_name="/caption")``, or plain HTTP
under ``/gradio_api/call/caption``). Concurrent calls wait in Gradio's queue (bounded by
``--queue_size``) and are batched into one ``generate`` call of at most ``--max_batch_size`` images.
Every image is decoded by :func:`modeling_clipcap.image_io.load_image` (decompression-bomb guard
included); a bad file is refused with a message that names it, in the page and to API clients,
before it reaches a batch, so it never fails anybody else's request.

Library use::

    from modeling_clipcap.app import build_app, launch_app
    demo = build_app("path/to/model")          # a gradio.Blocks
    launch_app(demo, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from .captioning import DTYPES, CaptionInputError, caption_items, load_captioner, resolve_model_path
from .image_io import DEFAULT_MAX_PIXELS, ImageLoadError, list_image_files, load_image

__all__ = [
    "AppInputError",
    "Decoding",
    "add_cli_arguments",
    "build_app",
    "caption_files",
    "cli_main",
    "launch_app",
    "load_app_models",
    "resolve_model_path",
]

DECODING_MODES: tuple[str, ...] = ("greedy", "beam search", "sampling")
#: images per ``generate`` call when the page captions a batch of uploads
PAGE_BATCH_SIZE = 16
#: examples shown under the upload box at most
MAX_EXAMPLES = 12
#: largest upload the server accepts (Gradio refuses bigger files before they reach the model)
DEFAULT_MAX_FILE_SIZE = "25mb"
#: Gradio's ``delete_cache`` for the app: every 10 minutes, delete uploads (and served copies) older than an hour
DEFAULT_DELETE_CACHE = (600, 3600)
#: the page keeps the downloads (JSON, CSV) of its last this many calls on disk
PAGE_DOWNLOADS_KEPT = 64

#: An argument of the app (model, CLIP model, examples, decoding choice) is unusable; the message says why. The
#: same class as the loader's error (``captioning.CaptionInputError``): one error type for unusable command inputs.
AppInputError = CaptionInputError


# ------------------------------------------------------------------------------------------ loading


def load_app_models(
    model: str | os.PathLike,
    clip_model: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> tuple[Any, Any, tuple[Any, Any] | None, Path]:
    """Load the captioner (:func:`modeling_clipcap.captioning.load_captioner`) and the CLIP model that scores
    captions, from folders or Hub ids.

    Returns:
        ``(model, processor, clip, model_dir)`` where ``clip`` is ``(CLIPModel, CLIPProcessor)`` or ``None`` and
        ``model_dir`` the model's local folder (a Hub id's download).

    Raises:
        AppInputError: a model cannot be found or loaded; the message names it and says what to do.
    """
    from .clip_score import load_clip

    captioner, processor = load_captioner(model, dtype=dtype, device=device)
    model_dir = Path(captioner.name_or_path)
    clip = None
    if clip_model is not None:
        clip_dir = resolve_model_path(clip_model, "--clip_model")
        try:
            clip = load_clip(clip_dir, device=captioner.device)
        except Exception as err:
            raise AppInputError(
                f"--clip_model {clip_model}: cannot load a CLIPModel and CLIPProcessor from {clip_dir} "
                f"({type(err).__name__}: {err}). Pass a CLIP checkpoint such as openai/clip-vit-base-patch32."
            ) from err
    return captioner, processor, clip, model_dir


def find_examples(model_dir: Path | None, examples: Sequence[str | os.PathLike] | None) -> list[Path]:
    """Example images: the files and folders given, else the model folder's ``examples/`` (at most 12).

    Raises:
        AppInputError: a given path does not exist or holds no image files.
    """
    sources: list[Path] = [Path(p) for p in examples] if examples else []
    if not sources and model_dir is not None and (model_dir / "examples").is_dir():
        sources = [model_dir / "examples"]
    found: list[Path] = []
    for source in sources:
        if source.is_dir():
            files = list_image_files(source)
            if not files and examples:
                raise AppInputError(
                    f"--examples {source}: the folder holds no image files (.jpg, .png, ...)."
                )
            found.extend(files)
        elif source.is_file():
            found.append(source)
        else:
            raise AppInputError(f"--examples {source}: no such file or folder.")
    return [p.resolve() for p in found[:MAX_EXAMPLES]]


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class Decoding:
    """The decoding a visitor chose on the page; :meth:`generate_kwargs` turns it into ``generate`` arguments."""

    mode: str = "greedy"
    num_beams: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    num_captions: int = 1
    max_new_tokens: int = 30

    @classmethod
    def from_generation_config(cls, config: Any) -> Decoding:
        """Defaults that reproduce the model's ``generation_config`` (what ``model.generate()`` does alone)."""
        beams = int(getattr(config, "num_beams", None) or 1)
        if getattr(config, "do_sample", False):
            mode = "sampling"
        else:
            mode = "beam search" if beams > 1 else "greedy"
        return cls(
            mode=mode,
            num_beams=beams if beams > 1 else 5,
            temperature=float(getattr(config, "temperature", None) or 1.0),
            top_p=float(getattr(config, "top_p", None) or 1.0),
            num_captions=int(getattr(config, "num_return_sequences", None) or 1),
            max_new_tokens=int(getattr(config, "max_new_tokens", None) or 30),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """``generate`` arguments for this choice.

        Raises:
            AppInputError: the combination is impossible (e.g. 3 captions with greedy decoding); the message
                names the control to change.
        """
        if self.mode not in DECODING_MODES:
            raise AppInputError(f"Decoding must be one of {', '.join(DECODING_MODES)}, got {self.mode!r}.")
        n, max_new = int(self.num_captions), int(self.max_new_tokens)
        if n < 1:
            raise AppInputError(f"Captions per image must be at least 1, got {n}.")
        if max_new < 1:
            raise AppInputError(f"Maximum length must be at least 1 token, got {max_new}.")
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "num_return_sequences": n}
        if self.mode == "greedy":
            if n > 1:
                raise AppInputError(
                    f"Greedy decoding writes one caption per image, but {n} were asked for: choose beam search "
                    f"(with at least {n} beams) or sampling, or set Captions per image to 1."
                )
            kwargs.update(do_sample=False, num_beams=1)
        elif self.mode == "beam search":
            beams = int(self.num_beams)
            if beams < n:
                raise AppInputError(
                    f"Beam search with {beams} beams can return at most {beams} captions per image, but {n} "
                    f"were asked for: raise Beams to {n} or more, or lower Captions per image."
                )
            kwargs.update(do_sample=False, num_beams=beams)
        else:
            if not self.temperature > 0:
                raise AppInputError(f"Temperature must be above 0, got {self.temperature}.")
            if not 0 < self.top_p <= 1:
                raise AppInputError(f"Top-p must be in (0, 1], got {self.top_p}.")
            kwargs.update(
                do_sample=True, num_beams=1, temperature=float(self.temperature), top_p=float(self.top_p)
            )
        return kwargs

    def describe(self) -> str:
        """A short human description (``"beam search, 5 beams, 2 captions, at most 30 tokens"``)."""
        parts = [self.mode]
        if self.mode == "beam search":
            parts.append(f"{int(self.num_beams)} beams")
        elif self.mode == "sampling":
            parts.append(f"temperature {self.temperature:g}, top-p {self.top_p:g}")
        if int(self.num_captions) > 1:
            parts.append(f"{int(self.num_captions)} captions per image")
        parts.append(f"at most {int(self.max_new_tokens)} tokens")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------ captioning


def _captions_with_prefix(
    model: Any,
    processor: Any,
    items: Iterable[Any],
    generate_kwargs: dict[str, Any],
    *,
    batch_size: int,
    on_bad_image: str,
    max_pixels: int | None,
) -> Iterator[tuple[Any, list[str], str | None, list[str], Any]]:
    """:func:`modeling_clipcap.captioning.caption_items` plus, per captioned image, its prefix read back as the K
    nearest vocabulary tokens (from the model inputs its captions came from) and its decoded image (for CLIPScore).

    Yields:
        ``(id, captions, error, prefix_tokens, image)`` per item, in order (``[]`` and ``None`` for a failed one).
    """
    extras: dict[Any, tuple[list[str], Any]] = {}

    def read_prefix(ids: list[Any], inputs: dict[str, Any], images: list[Any] | None) -> None:
        tokens = model.interpret_prefix(**inputs, tokenizer=processor.tokenizer)  # (B, K) token strings
        extras.update(zip(ids, zip(tokens, images or [None] * len(ids))))

    for image_id, captions, error in caption_items(
        model,
        processor,
        items,
        batch_size=batch_size,
        on_bad_image=on_bad_image,
        max_pixels=max_pixels,
        on_batch=read_prefix,
        **generate_kwargs,
    ):
        tokens, image = extras.pop(image_id, ([], None))
        yield image_id, captions, error, list(tokens), image


def caption_pil_images(
    model: Any, processor: Any, images: list[Any], generate_kwargs: dict[str, Any]
) -> tuple[list[list[str]], list[list[str]]]:
    """Captions and prefix tokens of decoded RGB images, in one ``generate`` call.

    Returns:
        ``(captions, prefix_tokens)``: per image, its ``num_return_sequences`` captions (the model's order) and
        the K nearest vocabulary tokens of its prefix.
    """
    results = list(
        _captions_with_prefix(
            model,
            processor,
            images,
            generate_kwargs,
            batch_size=max(len(images), 1),
            on_bad_image="fail",
            max_pixels=None,  # decoded already, under the limit of whoever decoded them
        )
    )
    return [r[1] for r in results], [r[3] for r in results]


def _clip_rank(
    clip: tuple[Any, Any], images: list[Any], captions: list[list[str]]
) -> list[list[tuple[str, float]]]:
    """Each image's captions with their CLIP-S, best first."""
    from .clip_score import compute_clip_score

    flat_images = [image for image, caps in zip(images, captions) for _ in caps]
    flat_captions = [c for caps in captions for c in caps]
    scores = compute_clip_score(clip[0], clip[1], flat_images, flat_captions, per_image=True)[
        "CLIP-S_per_image"
    ]
    ranked, start = [], 0
    for caps in captions:
        pairs = list(zip(caps, scores[start : start + len(caps)]))
        start += len(caps)
        ranked.append(sorted(pairs, key=lambda pair: -pair[1]))
    return ranked


def _upload_rows(files: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Uploaded files as rows of :func:`modeling_clipcap.captioning.caption_items`: id = position, errors name the
    file by its name (the upload folder is the server's business)."""
    return [{"image_id": i, "image": str(path), "name": _display_name(path)} for i, path in enumerate(files)]


def _display_name(path: str | os.PathLike) -> str:
    return Path(path).name


def caption_files(
    model: Any,
    processor: Any,
    files: Sequence[str | os.PathLike],
    decoding: Decoding,
    clip: tuple[Any, Any] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_size: int = PAGE_BATCH_SIZE,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Caption image files for the page: one result per file, in order.

    Args:
        files: image paths (the uploads).
        decoding: the visitor's decoding choice.
        clip: ``(CLIPModel, CLIPProcessor)`` to score and re-rank the captions, or ``None``.
        max_pixels: decompression-bomb limit passed to :func:`load_image`.
        progress: a callable ``progress(fraction, desc=...)`` (``gradio.Progress``) or ``None``.

    Returns:
        ``{"image": name, "path": path, "captions": [{"rank", "caption", "clip_score"}], "prefix_tokens":
        [K tokens], "error": None}`` per file; a file that cannot be read has ``captions == []`` and its
        ``error``.

    Raises:
        AppInputError: the decoding choice is impossible.
    """
    generate_kwargs = decoding.generate_kwargs()
    rows = _upload_rows(files)
    stream = _captions_with_prefix(
        model,
        processor,
        rows,
        generate_kwargs,
        batch_size=batch_size,
        on_bad_image="skip",
        max_pixels=max_pixels,
    )
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        if progress is not None:
            progress(
                start / len(files),
                desc=f"captioning images {start + 1}-{min(start + batch_size, len(files))}",
            )
        batch = list(islice(stream, batch_size))  # one generate call of the captioning path
        done = [entry for entry in batch if entry[2] is None]
        if clip is not None and done:
            ranked = iter(_clip_rank(clip, [entry[4] for entry in done], [entry[1] for entry in done]))
        else:
            ranked = iter([[(c, None) for c in entry[1]] for entry in done])
        for index, _, error, tokens, _ in batch:
            result = {
                "image": rows[index]["name"],
                "path": rows[index]["image"],
                "captions": [],
                "prefix_tokens": [],
            }
            if error is None:
                pairs = next(ranked)
                result["captions"] = [
                    {"rank": i + 1, "caption": text, "clip_score": score}
                    for i, (text, score) in enumerate(pairs)
                ]
                result["prefix_tokens"] = tokens
            result["error"] = error
            results.append(result)
    if progress is not None:
        progress(1.0, desc="done")
    return results


def format_prefix_tokens(tokens: Sequence[str]) -> str:
    """The prefix's nearest tokens for display: one per prefix position, separated by " · " (spaces shown)."""
    return " · ".join(repr(t) if t != t.strip() or not t else t for t in tokens)


def table_headers(with_clip_score: bool) -> list[str]:
    """Column names of :func:`results_table`."""
    return ["image", "rank", "caption"] + (["CLIP-S"] if with_clip_score else []) + ["prefix: nearest tokens"]


def results_table(results: list[dict[str, Any]], with_clip_score: bool) -> list[list[Any]]:
    """Rows ``[image, rank, caption, (CLIP-S,) prefix tokens]``: one per caption, one per failed file."""
    rows: list[list[Any]] = []
    for result in results:
        if result["error"] is not None:
            row = [result["image"], "", f"error: {result['error']}"] + [""] * (2 if with_clip_score else 1)
            rows.append(row)
            continue
        for entry in result["captions"]:
            row = [result["image"], entry["rank"], entry["caption"]]
            if with_clip_score:
                row.append(round(entry["clip_score"], 4))
            row.append(format_prefix_tokens(result["prefix_tokens"]) if entry["rank"] == 1 else "")
            rows.append(row)
    return rows


def write_downloads(results: list[dict[str, Any]], decoding: Decoding, folder: Path) -> tuple[Path, Path]:
    """``captions.json`` (everything, with the decoding) and ``captions.csv`` (one row per caption) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    public = [{k: v for k, v in r.items() if k != "path"} for r in results]
    json_path = folder / "captions.json"
    json_path.write_text(
        json.dumps({"decoding": decoding.__dict__, "results": public}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    csv_path = folder / "captions.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "caption", "clip_score", "prefix_tokens", "error"])
        for r in public:
            tokens = " ".join(r["prefix_tokens"])
            if r["error"] is not None:
                writer.writerow([r["image"], "", "", "", "", r["error"]])
            for entry in r["captions"]:
                score = "" if entry["clip_score"] is None else f"{entry['clip_score']:.4f}"
                writer.writerow([r["image"], entry["rank"], entry["caption"], score, tokens, ""])
    return json_path, csv_path


# ------------------------------------------------------------------------------------------ the Gradio app


class ModelThread:
    """Runs every model call of an app on one dedicated thread.

    Gradio runs each event handler on whichever thread of its worker pool is free, and glibc gives each thread
    that allocates its own malloc arena (up to 8 per core): the batches' tensors (pixel values, KV caches,
    logits of varying batch sizes) then spread over many arenas, each keeping its own freed memory, and the
    server's resident memory climbs with every request for thousands of requests (measured in
    ``docs/performance.md``, "App soak"). On one thread the model's allocations stay in one arena and are reused.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipcap-model")

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the model thread, in the caller's context (Gradio's progress tracker is a
        context variable); waits for it and returns its result (or raises its error)."""
        import contextvars

        context = contextvars.copy_context()
        return self._executor.submit(context.run, fn, *args, **kwargs).result()


def _prune_downloads(root: Path, keep: int = PAGE_DOWNLOADS_KEPT) -> None:
    """Delete all but the newest ``keep`` download folders under ``root`` (Gradio serves its own copies)."""
    import shutil

    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    for folder in folders[: max(len(folders) - keep, 0)]:
        shutil.rmtree(folder, ignore_errors=True)


def _import_gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls
    try:
        import gradio as gr
    except ModuleNotFoundError as err:
        raise AppInputError(
            "clipcap app needs Gradio, which is not installed: pip install 'modeling_clipcap[app]'."
        ) from err
    _fix_batched_validators()
    return gr


def _fix_batched_validators() -> None:
    """Make Gradio honour a validator's verdict on a batched event.

    Gradio 6 (checked up to 6.31) runs the validator of a ``batch=True`` event in batch mode and gets its
    result back as a tuple, which ``process_validation_response`` only inspects when it is a list: every
    request then counts as valid. The ``caption`` endpoint relies on its validator to refuse a bad file
    before it joins a batch (an error inside a batch fails every request of that batch), so hand the tuple
    over as a list. Harmless where Gradio already returns a list; skipped if Gradio renames the function.
    """
    from gradio import queueing

    original = getattr(queueing, "process_validation_response", None)
    if original is None or getattr(original, "_clipcap_accepts_tuples", False):
        return

    def process_validation_response(validation_response: Any, fn: Any = None) -> Any:
        if isinstance(validation_response, tuple):
            validation_response = list(validation_response)
        return original(validation_response, fn)

    process_validation_response._clipcap_accepts_tuples = True  # type: ignore[attr-defined]
    queueing.process_validation_response = process_validation_response


def _model_label(model: Any, model_dir: Path | None) -> str:
    """The model's name for the page: a Hub id as given, a local folder by its last two path parts."""
    name = getattr(model, "name_or_path", "") or (str(model_dir) if model_dir else "")
    if not name:
        return "ClipCap model"
    return "/".join(Path(name).resolve().parts[-2:]) if Path(name).exists() else name


def _attach_datastore(model: Any, processor: Any, datastore: Any) -> None:
    """Give the processor the datastore that ``caption_items`` retrieves from (``processor.datastore``)."""
    from .captioning import check_retrieval
    from .retrieval import Datastore

    try:
        if isinstance(datastore, (str, os.PathLike)):
            datastore = Datastore.load(datastore)
        check_retrieval(model, datastore)
    except ValueError as err:
        raise AppInputError(f"--datastore: {err}") from err
    if getattr(model.config, "retrieval_k", 0) and datastore is None:
        raise AppInputError(
            f"the model is retrieval-augmented (retrieval_k={model.config.retrieval_k}): pass --datastore DIR."
        )
    processor.datastore = datastore


def _app_models(
    model: Any,
    processor: Any,
    clip_model: str | os.PathLike | tuple[Any, Any] | None,
    dtype: str,
    device: str | None,
) -> tuple[Any, Any, tuple[Any, Any] | None, Path | None]:
    """``build_app``'s model arguments -> ``(model, processor, clip, model_dir)``, loading what is given by name."""
    clip: tuple[Any, Any] | None = clip_model if isinstance(clip_model, tuple) else None
    if isinstance(model, (str, os.PathLike)):
        model, processor, loaded_clip, model_dir = load_app_models(
            model, None if clip is not None else clip_model, dtype=dtype, device=device
        )
        return model, processor, clip or loaded_clip, model_dir
    if processor is None:
        raise AppInputError("build_app(model, processor): pass the processor together with a loaded model.")
    if clip_model is not None and clip is None:
        from .clip_score import load_clip

        clip = load_clip(resolve_model_path(clip_model, "--clip_model"), device=model.device)
    name_or_path = getattr(model, "name_or_path", "")
    model_dir = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
    return model, processor, clip, model_dir


def _upload_path(file: Any) -> str:
    """The server-side path of a Gradio upload (a path string, or a file object with ``.name``)."""
    return file if isinstance(file, str) else getattr(file, "name", str(file))


def _page_handler(
    gr: Any,
    model: Any,
    processor: Any,
    clip: tuple[Any, Any] | None,
    max_pixels: int | None,
    headers: list[str],
    model_thread: ModelThread | None = None,
) -> Any:
    """The page's "Caption" callback: uploads and decoding controls -> gallery, text, table, downloads, status."""
    output_root = Path(tempfile.mkdtemp(prefix="clipcap-app-"))
    run_model = model_thread.run if model_thread is not None else (lambda fn, *a, **k: fn(*a, **k))

    def run_page(
        files,
        mode,
        num_beams,
        temperature,
        top_p,
        num_captions,
        max_new_tokens,
        progress=gr.Progress(),  # noqa: B008  (Gradio finds the progress tracker by this default)
    ):
        paths = [_upload_path(f) for f in (files or [])]
        if not paths:
            raise gr.Error(
                "No image to caption: drop one or more image files on the box, or pick an example.",
                print_exception=False,
            )
        decoding = Decoding(
            mode, int(num_beams), float(temperature), float(top_p), int(num_captions), int(max_new_tokens)
        )
        started = time.perf_counter()
        try:
            results = run_model(
                caption_files,
                model, processor, paths, decoding, clip=clip, max_pixels=max_pixels, progress=progress,
            )  # fmt: skip
        except AppInputError as err:
            raise gr.Error(str(err), print_exception=False) from err
        except (ValueError, RuntimeError) as err:
            raise gr.Error(f"Captioning failed ({type(err).__name__}: {err}).") from err
        seconds = time.perf_counter() - started
        failed = [r for r in results if r["error"] is not None]
        if len(failed) == len(results):
            raise gr.Error("\n".join(r["error"] for r in failed), print_exception=False)
        for r in failed:
            gr.Warning(r["error"])
        json_path, csv_path = write_downloads(results, decoding, output_root / f"{time.time_ns()}")
        _prune_downloads(output_root)
        done = [r for r in results if r["error"] is None]
        gallery = [(r["path"], r["captions"][0]["caption"]) for r in done]
        text = "\n".join(f"{r['image']}: {r['captions'][0]['caption']}" for r in done)
        status = (
            f"Captioned {len(done)} of {len(results)} image(s) in {seconds:.2f} s ({decoding.describe()})."
        )
        if failed:
            status += f" {len(failed)} file(s) could not be read; see the table."
        if clip is not None:
            status += " Captions are ranked by CLIPScore (CLIP-S, 0 to 2.5)."
        table_value = {"headers": headers, "data": results_table(results, clip is not None)}
        return gallery, text, table_value, [str(json_path), str(csv_path)], status

    # the download folder lives as long as the page: removed when the handler goes, or at interpreter exit
    run_page.output_root = output_root
    weakref.finalize(run_page, shutil.rmtree, str(output_root), True)
    return run_page


def _api_handlers(
    gr: Any, model: Any, processor: Any, max_pixels: int | None, model_thread: ModelThread | None = None
) -> tuple[Any, Any]:
    """The ``caption`` endpoint's validator (refuses a bad file before it joins a batch) and batched callback."""
    run_model = model_thread.run if model_thread is not None else (lambda fn, *a, **k: fn(*a, **k))

    def validate_api_image(images: list[Any]) -> tuple[list[Any]]:
        # batched event: one list per input with one entry per request (always a single request here)
        verdicts = []
        for image in images:
            if not image:
                verdicts.append(
                    gr.validate(
                        False, "no image was sent: attach one image file (gradio_client: handle_file(path))."
                    )
                )
                continue
            path = _upload_path(image)
            try:
                load_image(path, max_pixels=max_pixels, name=_display_name(path))
                verdicts.append(gr.validate(True, ""))
            except ImageLoadError as err:
                verdicts.append(gr.validate(False, str(err)))
        return (verdicts,)

    def caption_api(images: list[Any]) -> tuple[list[str]]:
        """Caption one image file (batched: Gradio hands over up to max_batch_size concurrent requests)."""
        rows = _upload_rows([_upload_path(image) for image in images])

        def caption_rows() -> list[Any]:
            return list(
                caption_items(
                    model,
                    processor,
                    rows,
                    batch_size=len(rows),
                    max_pixels=max_pixels,
                    num_return_sequences=1,
                )
            )

        try:
            results = run_model(caption_rows)
        except (
            ImageLoadError
        ) as err:  # the validator refused such files already; only a vanished file gets here
            raise gr.Error(str(err), print_exception=False) from err
        return ([captions[0] for _, captions, _ in results],)

    return validate_api_image, caption_api


def _decoding_controls(gr: Any, defaults: Decoding) -> list[Any]:
    """The "Decoding" accordion: mode, beams, temperature, top-p, captions per image, maximum length."""
    with gr.Accordion("Decoding", open=False):
        return [
            gr.Radio(list(DECODING_MODES), value=defaults.mode, label="Decoding"),
            gr.Slider(1, 10, value=defaults.num_beams, step=1, label="Beams (beam search)"),
            gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature (sampling)"),
            gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (sampling)"),
            gr.Slider(1, 10, value=defaults.num_captions, step=1, label="Captions per image"),
            gr.Slider(
                1,
                max(100, defaults.max_new_tokens),
                value=defaults.max_new_tokens,
                step=1,
                label="Maximum length (tokens)",
            ),
        ]


def _page_layout(
    gr: Any, example_files: list[Path], defaults: Decoding, headers: list[str]
) -> tuple[list[Any], list[Any], Any]:
    """The page's components (inside ``gr.Blocks``): ``(inputs, outputs, run button)`` of the page callback."""
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(
                label="Images", file_count="multiple", file_types=["image"], elem_id="clipcap-images"
            )
            if example_files:
                gr.Examples(examples=[[[str(p)]] for p in example_files], inputs=[files], label="Examples")
            controls = _decoding_controls(gr, defaults)
            run = gr.Button("Caption", variant="primary", elem_id="clipcap-run")
        with gr.Column(scale=2):
            captions_text = gr.Textbox(
                label="Captions", lines=3, interactive=False, elem_id="clipcap-captions"
            )
            gallery = gr.Gallery(
                label="Images and captions",
                columns=4,
                height=320,
                object_fit="contain",
                elem_id="clipcap-gallery",
            )
            status = gr.Markdown(elem_id="clipcap-status")
            table = gr.Dataframe(headers=headers, interactive=False, wrap=True, elem_id="clipcap-table")
            downloads = gr.File(label="Download (JSON, CSV)", file_count="multiple", interactive=False)
    return [files, *controls], [gallery, captions_text, table, downloads, status], run


def build_app(
    model: Any,
    processor: Any = None,
    *,
    clip_model: str | os.PathLike | tuple[Any, Any] | None = None,
    examples: Sequence[str | os.PathLike] | None = None,
    max_batch_size: int = 8,
    queue_size: int = 64,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    dtype: str = "float32",
    device: str | None = None,
    delete_cache: tuple[int, int] | None = DEFAULT_DELETE_CACHE,
    datastore: Any = None,
) -> Any:
    """Build the captioning page and the ``caption`` API endpoint (a ``gradio.Blocks``, not yet launched).

    Args:
        model: a model folder or Hub id, or a loaded ``ClipCapForConditionalGeneration`` (then pass ``processor``).
        processor: the ``ClipCapProcessor`` of a loaded model; ``None`` when ``model`` is a folder or id.
        clip_model: a CLIP folder or Hub id, or a loaded ``(CLIPModel, CLIPProcessor)``, to score and re-rank
            captions with CLIPScore; ``None`` for none.
        examples: example image files or folders; default: the model folder's ``examples/`` if it has one.
        max_batch_size: most API requests captioned in one ``generate`` call.
        queue_size: most requests waiting in the queue (more are refused with "queue is full").
        max_pixels: largest ``width * height`` accepted (decompression-bomb guard).
        dtype, device: how to load a model given by folder or id (see ``clipcap caption``).
        delete_cache: Gradio's ``(frequency, age)`` in seconds: every ``frequency`` s, uploaded files and served
            copies older than ``age`` s are deleted (``None``: kept until the server stops).
        datastore: a retrieval-augmented model's datastore (a folder built by ``clipcap index``, or a loaded
            ``retrieval.Datastore``); every caption of the page and the API retrieves from it.

    Every model call runs on one dedicated thread (:class:`ModelThread`), so the server's memory stays flat under
    load.

    Raises:
        AppInputError: a model, example or limit is unusable; the message says what to do.
    """
    gr = _import_gradio()
    for name, value in (("max_batch_size", max_batch_size), ("queue_size", queue_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AppInputError(f"--{name} must be a positive integer, got {value!r}.")
    model, processor, clip, model_dir = _app_models(model, processor, clip_model, dtype, device)
    _attach_datastore(model, processor, datastore)
    model.eval()
    example_files = find_examples(model_dir, examples)
    label = _model_label(model, model_dir)
    headers = table_headers(clip is not None)
    model_thread = ModelThread()
    run_page = _page_handler(gr, model, processor, clip, max_pixels, headers, model_thread)
    validate_api_image, caption_api = _api_handlers(gr, model, processor, max_pixels, model_thread)
    with gr.Blocks(
        title=f"ClipCap captioning: {label}", analytics_enabled=False, delete_cache=delete_cache
    ) as demo:
        gr.Markdown(
            f"# ClipCap captioning\nModel: `{label}`. Drop one image or many; each gets its caption, the "
            "prefix read back as its nearest vocabulary tokens"
            + (", and its CLIPScore" if clip is not None else "")
            + ". The API endpoint `caption` takes one image file and returns its caption."
        )
        inputs, outputs, run = _page_layout(
            gr, example_files, Decoding.from_generation_config(model.generation_config), headers
        )
        run.click(
            run_page,
            inputs=inputs,
            outputs=outputs,
            api_name="caption_page",
            concurrency_id="clipcap-model",
            concurrency_limit=1,
        )
        # API-only endpoint: one image file in, its caption out; batched across concurrent callers.
        api_image = gr.File(visible=False, file_count="single", file_types=["image"])
        api_caption = gr.Textbox(visible=False)
        gr.Button(visible=False).click(
            caption_api,
            inputs=[api_image],
            outputs=[api_caption],
            api_name="caption",
            batch=True,
            max_batch_size=max_batch_size,
            validator=validate_api_image,
            concurrency_id="clipcap-model",
            concurrency_limit=1,
        )
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.clipcap_allowed_paths = sorted({str(p.parent) for p in example_files})
    return demo


def launch_app(
    demo: Any,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    max_file_size: str | int | None = DEFAULT_MAX_FILE_SIZE,
    **launch_kwargs: Any,
) -> Any:
    """``demo.launch`` with the app's settings: error text shown to the page and API clients, example folders
    served, uploads bounded, no server-side rendering (no Node.js needed).

    ``host=None`` / ``port=None`` let Gradio choose (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``, as a Space
    sets them). Extra keyword arguments go to ``demo.launch`` (e.g. ``prevent_thread_lock=True``).
    """
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        allowed_paths=list(getattr(demo, "clipcap_allowed_paths", [])),
        max_file_size=max_file_size,
        ssr_mode=False,
        **launch_kwargs,
    )


# ------------------------------------------------------------------------------------------ command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``clipcap app``."""
    from .cli import add_bool_argument

    parser.add_argument(
        "--model", required=True, help="a saved ClipCap model folder or a Hugging Face Hub model id"
    )
    parser.add_argument(
        "--clip_model",
        default=None,
        help="a CLIP model folder or Hub id (e.g. openai/clip-vit-base-patch32): score captions with CLIPScore "
        "and rank them by it",
    )
    parser.add_argument(
        "--examples",
        nargs="+",
        default=None,
        metavar="IMAGE_OR_FOLDER",
        help="example images shown under the upload box (default: the model folder's examples/ if any)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    add_bool_argument(parser, "share", help="also open a temporary public gradio.live link")
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=8,
        help="most API requests captioned in one generate call (default 8)",
    )
    parser.add_argument(
        "--queue_size", type=int, default=64, help="most requests waiting; more are refused (default 64)"
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest width*height accepted (decompression-bomb guard, default {DEFAULT_MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--max_file_size",
        default=DEFAULT_MAX_FILE_SIZE,
        help=f"largest upload (default {DEFAULT_MAX_FILE_SIZE})",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model precision")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--datastore", default=None, help="retrieval datastore (clipcap index) of a retrieval-augmented model"
    )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``clipcap app`` until interrupted. Returns 2 for unusable arguments, models or a missing Gradio."""
    if not 0 < args.port < 65536:
        print(f"error: --port must be between 1 and 65535, got {args.port}.", file=sys.stderr)
        return 2
    if args.max_pixels is not None and args.max_pixels < 1:
        print(f"error: --max_pixels must be a positive integer, got {args.max_pixels}.", file=sys.stderr)
        return 2
    try:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        demo = build_app(
            args.model,
            clip_model=args.clip_model,
            examples=args.examples,
            max_batch_size=args.max_batch_size,
            queue_size=args.queue_size,
            max_pixels=args.max_pixels,
            dtype=args.dtype,
            device=args.device,
            datastore=args.datastore,
        )
    except AppInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        launch_app(demo, host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size)
    except KeyboardInterrupt:
        return 130
    except OSError as err:  # e.g. the port is taken
        print(
            f"error: cannot start the server on {args.host}:{args.port} ({err}). Pick another --port.",
            file=sys.stderr,
        )
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modeling_clipcap.app ...`` (same as ``clipcap app ...``)."""
    parser = argparse.ArgumentParser(prog="clipcap app", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
