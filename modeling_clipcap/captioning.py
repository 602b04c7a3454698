"""``clipcap caption``: caption image files and folders with a saved ClipCap model.

Library use::

    from modeling_clipcap.captioning import caption_images, load_captioner
    model, processor = load_captioner("path/to/model")
    for path, caption, error in caption_images(model, processor, ["a.jpg", "b.png"], batch_size=32):
        print(path, caption if error is None else f"FAILED: {error}")

Command line::

    clipcap caption photos/ extra.jpg --model path/to/model --num_beams 5 --batch_size 32 [--json]

Output: one line per image on stdout, ``PATH<TAB>CAPTION`` (or one JSON object per line with
``--json``), in the order the inputs were given, folders expanded to their image files sorted by
name. An unreadable file gets ``error: PATH: reason`` on stderr and the others are still captioned;
the exit status is then 1. Bad arguments or a model folder that cannot be loaded give a one-line
message and exit status 2. Images are read and captioned one batch at a time, so memory stays flat
however many images are given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from .image_io import ImageLoadError, list_image_files, load_image

__all__ = [
    "add_cli_arguments",
    "caption_batch",
    "caption_images",
    "cli_main",
    "expand_inputs",
    "load_captioner",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bfloat16-vision": torch.float32,
}
#: ``bfloat16-vision``: only the CLIP tower in bf16 (where the FLOPs are); mapper and GPT-2 stay fp32, which
#: keeps the captions (docs/performance.md measured 96-97% agreement with fp32 vs 76-87% for a bf16 GPT-2).


class CaptionInputError(ValueError):
    """A command-line input (model folder, argument value) is unusable; the message says why."""


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> Iterator[tuple[str, str | None]]:
    """Turn files and folders into ``(path, problem)`` pairs, in the order given.

    A folder becomes its image files (by extension, sorted by name, not recursive). A file is passed
    through whatever its extension (a bad one is reported when it is read). A missing path, or a folder
    without image files, yields ``(path, problem)`` with a message; otherwise ``problem`` is ``None``.
    """
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = list_image_files(path)
            if not files:
                yield str(path), "the folder contains no image files (.jpg, .png, ...)"
            for file in files:
                yield str(file), None
        elif path.exists():
            yield str(path), None
        else:
            yield str(path), "no such file or folder"


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


@torch.no_grad()
def caption_batch(
    model: Any,
    processor: Any,
    *,
    images: list[Any] | None = None,
    pixel_values: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    image_inputs: dict[str, torch.Tensor] | None = None,
    **generation_kwargs: Any,
) -> list[str]:
    """The library's one images -> ``generate`` -> text step (captioning, evaluation, training's validation).

    Args:
        model: a ClipCap model; inputs are moved to its device (and floating ones to its dtype).
        processor: its ``ClipCapProcessor`` (``images`` -> ``pixel_values``; ``batch_decode``).
        images: PIL images, turned into ``pixel_values`` (B, 3, H, W) by the processor, with every other tensor
            it returns (SigLIP2: ``pixel_attention_mask`` (B, N), ``spatial_shapes`` (B, 2)) passed on too; or give
            ``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D) / (B, N, D) directly.
        image_inputs: with ``pixel_values``, the other tensors the image tower takes (SigLIP2's mask and shapes).
        **generation_kwargs: passed to ``model.generate`` (``num_beams``, ``max_new_tokens``, ...).

    Returns:
        B * ``num_return_sequences`` captions, special tokens removed and white space collapsed.
    """
    tower_inputs = dict(image_inputs or {})
    if images is not None:
        processed = processor(images=images, return_tensors="pt")
        pixel_values = processed["pixel_values"]
        tower_inputs.update(
            {k: v for k, v in processed.items() if k != "pixel_values" and torch.is_tensor(v)}
        )
    inputs = {
        name: value.to(device=model.device, dtype=model.dtype)
        for name, value in (("pixel_values", pixel_values), ("image_embeds", image_embeds))
        if value is not None
    }
    inputs.update({name: value.to(model.device) for name, value in tower_inputs.items()})
    output = model.generate(**inputs, **generation_kwargs)  # (B, T) ids, or an output with .sequences
    sequences = output.sequences if hasattr(output, "sequences") else output
    return [" ".join(text.split()) for text in processor.batch_decode(sequences, skip_special_tokens=True)]


def caption_images(
    model: Any,
    processor: Any,
    paths: Iterable[str | os.PathLike | tuple[str, str | None]],
    batch_size: int = 16,
    **generation_kwargs: Any,
) -> Iterator[tuple[str, str | None, str | None]]:
    """Caption image files lazily, one batch at a time.

    Args:
        model: a ``ClipCapForConditionalGeneration`` with a vision tower (in eval mode).
        processor: its ``ClipCapProcessor``.
        paths: image paths (an iterable, consumed lazily), or ``(path, problem)`` pairs as produced by
            :func:`expand_inputs` (a pair with a problem is reported without being read).
        batch_size: images per ``generate`` call; at most this many decoded images are held at once.
        **generation_kwargs: passed to ``model.generate`` (``num_beams``, ``max_new_tokens``, ...).

    Yields:
        ``(path, caption, None)`` for every captioned image and ``(path, None, error)`` for every file that
        could not be read (the error names the file and says why), in input order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if getattr(model, "vision_model", True) is None:
        raise ValueError(
            "this model has no vision tower (it was built with vision_config=None and takes only "
            "image_embeds); caption files with a model that includes its CLIP vision tower."
        )

    def normalized() -> Iterator[tuple[str, str | None]]:
        for item in paths:
            if isinstance(item, tuple):
                yield str(item[0]), item[1]
            else:
                yield str(item), None

    for batch in _batches(normalized(), batch_size):
        loaded: list[tuple[str, Any, str | None]] = []
        for path, problem in batch:
            if problem is not None:
                loaded.append((path, None, problem))
                continue
            try:
                loaded.append((path, load_image(path), None))
            except ImageLoadError as err:
                loaded.append((path, None, str(err)))
        good = [(i, image) for i, (_, image, _) in enumerate(loaded) if image is not None]
        captions: dict[int, str] = {}
        errors: dict[int, str] = {}
        if good:
            try:
                texts = caption_batch(
                    model, processor, images=[image for _, image in good], **generation_kwargs
                )
                captions = {i: text for (i, _), text in zip(good, texts)}
            except (ValueError, RuntimeError) as batch_err:
                if len(good) == 1:
                    errors[good[0][0]] = f"captioning failed ({type(batch_err).__name__}: {batch_err})"
                else:  # find the image(s) responsible: caption them one at a time
                    for i, image in good:
                        try:
                            captions[i] = caption_batch(
                                model, processor, images=[image], **generation_kwargs
                            )[0]
                        except (ValueError, RuntimeError) as err:
                            errors[i] = f"captioning failed ({type(err).__name__}: {err})"
        for i, (path, _, problem) in enumerate(loaded):
            if problem is not None:
                yield path, None, problem
            elif i in errors:
                yield path, None, errors[i]
            else:
                yield path, captions[i], None
        del loaded, good  # nothing from this batch outlives it


def resolve_device(name: str | None) -> torch.device:
    """``--device`` (default: cuda if available, else cpu) of ``clipcap caption / evaluate / app``.

    Raises:
        CaptionInputError: ``name`` is not a torch device, or a CUDA device this machine lacks (named).
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CaptionInputError(
            f"--device {name!r} is not a torch device ({err}); e.g. cpu, cuda, cuda:1."
        ) from None
    if device.type == "cuda" and not 0 <= (device.index or 0) < torch.cuda.device_count():
        raise CaptionInputError(
            f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); use --device cpu."
        )
    return device


def load_captioner(
    model_dir: str | os.PathLike, dtype: str = "float32", device: str | None = None
) -> tuple[Any, Any]:
    """Load a saved ClipCap model folder (model + processor) for captioning.

    Raises:
        CaptionInputError: the folder is missing, lacks files, or cannot be loaded, or ``device`` is not usable
            here; the message says what to do.
    """
    torch_device = resolve_device(device)  # before any weights are read
    from . import ClipCapForConditionalGeneration, ClipCapProcessor

    path = Path(model_dir)
    if not path.exists():
        raise CaptionInputError(
            f"model folder {path} does not exist. Pass --model a folder written by save_pretrained "
            "(config.json, model.safetensors, processor and tokenizer files)."
        )
    if not path.is_dir():
        raise CaptionInputError(f"--model {path} is a file; pass the folder that contains config.json.")
    if not (path / "config.json").is_file():
        raise CaptionInputError(
            f"model folder {path} has no config.json; pass a folder written by save_pretrained "
            "(a training run's final output folder)."
        )
    if dtype not in DTYPES:
        raise CaptionInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    try:
        model = ClipCapForConditionalGeneration.from_pretrained(str(path), dtype=DTYPES[dtype])
        if dtype == "bfloat16-vision" and model.vision_model is not None:
            model.vision_model.to(torch.bfloat16)
    except Exception as err:  # any loading failure becomes one clear line
        raise CaptionInputError(
            f"cannot load the model in {path} ({type(err).__name__}: {err}). Check that it was saved by "
            "ClipCapForConditionalGeneration.save_pretrained and is complete."
        ) from err
    try:
        processor = ClipCapProcessor.from_pretrained(str(path))
    except Exception as err:
        raise CaptionInputError(
            f"cannot load the processor (image processor + tokenizer) in {path} ({type(err).__name__}: "
            f"{err}). Save it next to the model with processor.save_pretrained({str(path)!r})."
        ) from err
    if model.vision_model is None:
        raise CaptionInputError(
            f"the model in {path} has no vision tower (image_embeds only), so it cannot caption image files."
        )
    model.to(torch_device).eval()
    return model, processor


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``clipcap caption``."""
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    parser.add_argument("--model", required=True, help="a saved ClipCap model folder (save_pretrained)")
    parser.add_argument(
        "--num_beams", type=int, default=None, help="beam width (default: the model's generation config)"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="longest caption in tokens (default: the model's generation config)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="images per generate call (default 16)")
    # Plain switches here (no true|false value): a value-taking flag would swallow an image path after it.
    parser.add_argument(
        "--json",
        action="store_true",
        help='write JSON lines {"image": PATH, "caption": TEXT, "error": null} instead of PATH<TAB>CAPTION '
        "(failed files get a line with caption null and the error, besides the stderr message)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="model precision; bfloat16-vision runs only the CLIP tower in bf16 (keeps the captions)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _write_result(out: TextIO, path: str, caption: str | None, error: str | None, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({"image": path, "caption": caption, "error": error}, ensure_ascii=False) + "\n")
    elif caption is not None:
        out.write(f"{path}\t{caption}\n")


def _error_line(path: str, error: str) -> str:
    # load_image's messages already say "cannot read image PATH: ..."; don't repeat the path
    prefix = f"cannot read image {path}: "
    reason = error[len(prefix) :] if error.startswith(prefix) else error
    return f"error: {path}: {reason}"


def cli_main(args: argparse.Namespace) -> int:
    """Run ``clipcap caption``. Returns 0 when every image was captioned, 1 when some file failed,
    2 for unusable arguments or model folders."""
    from tqdm.auto import tqdm

    for name in ("num_beams", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name} must be a positive integer, got {value}.", file=sys.stderr)
            return 2
    try:
        items = list(expand_inputs(args.inputs))
    except ImageLoadError as err:  # e.g. a folder that cannot be listed
        print(f"error: {err}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()  # no "Loading weights" bar either
    try:
        model, processor = load_captioner(args.model, dtype=args.dtype, device=args.device)
    except CaptionInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    generation_kwargs: dict[str, Any] = {}
    if args.num_beams is not None:
        generation_kwargs["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        generation_kwargs["max_new_tokens"] = args.max_new_tokens
    failed = 0
    out = sys.stdout
    progress = tqdm(total=len(items), desc="captioning", unit="img", file=sys.stderr, disable=args.quiet)
    try:
        for path, caption, error in caption_images(
            model, processor, items, batch_size=args.batch_size, **generation_kwargs
        ):
            if error is not None:
                failed += 1
                progress.write(_error_line(path, error), file=sys.stderr)
            _write_result(out, path, caption, error, args.json)
            progress.update(1)
            if progress.n % args.batch_size == 0:
                out.flush()
    except KeyboardInterrupt:
        progress.close()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        progress.close()
        out.flush()
    if failed:
        print(
            f"{failed} of {len(items)} file(s) could not be captioned (see the error lines above).",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modeling_clipcap.captioning ...`` (same as ``clipcap caption ...``)."""
    parser = argparse.ArgumentParser(prog="clipcap caption", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
