"""The one captioning path and the one model loader; ``clipcap caption`` on top of them.

:func:`caption_items` is the library's one loop from images to captions: it reads them under the bad-image
policy (:func:`modeling_clipcap.image_io.check_bad_image_policy`), runs the processor once per image, batches,
generates and decodes. ``clipcap caption``, ``clipcap evaluate``, training's validation, the
``image-captioning`` pipeline and ``clipcap app`` all caption through it. :func:`load_captioner` is the one
model loader of ``clipcap caption | evaluate | app``: a saved folder or a Hugging Face Hub model id, a precision
and a device.

Library use::

    from modeling_clipcap.captioning import caption_items, load_captioner
    model, processor = load_captioner("path/or/org/clipcap-coco")
    for image_id, captions, error in caption_items(model, processor, ["a.jpg", "b.png"], on_bad_image="skip"):
        print(image_id, captions[0] if error is None else f"FAILED: {error}")

Command line::

    clipcap caption photos/ extra.jpg --model path/or/org/clipcap-coco --num_beams 5 --batch_size 32 [--json]

Output: one line per image on stdout, ``PATH<TAB>CAPTION`` (or one JSON object per line with
``--json``), in the order the inputs were given, folders expanded to their image files sorted by
name. An unreadable file gets ``error: PATH: reason`` on stderr and the others are still captioned;
the exit status is then 1. Bad arguments or a model that cannot be loaded give a one-line
message and exit status 2. Images are read and captioned one batch at a time, so memory stays flat
however many images are given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from .image_io import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    check_bad_image_policy,
    list_image_files,
    load_image,
)

__all__ = [
    "BACKENDS",
    "CaptionInputError",
    "add_cli_arguments",
    "caption_batch",
    "caption_images",
    "caption_items",
    "cli_main",
    "expand_inputs",
    "load_captioner",
    "resolve_device",
    "resolve_model_path",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bfloat16-vision": torch.float32,
}
#: ``bfloat16-vision``: only the CLIP tower in bf16 (where the FLOPs are); mapper and GPT-2 stay fp32, which
#: keeps the captions (docs/performance.md measured 96-97% agreement with fp32 vs 76-87% for a bf16 GPT-2).

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: ``on_batch(ids, inputs, images)`` of :func:`caption_items`: the ids of a batch just captioned, the model inputs
#: its captions were generated from (on the model's device) and its decoded images (``None`` for precomputed
#: inputs).
BatchHook = Callable[[list[Any], dict[str, torch.Tensor], list[Any] | None], None]


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


# ------------------------------------------------------------------------------------------ the captioning path


def _model_inputs(model: Any, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``inputs`` on the model's device; images (``pixel_values``, ``image_embeds``) in its dtype."""
    out = {}
    for name, value in inputs.items():
        if not torch.is_tensor(value):
            continue
        if name in ("pixel_values", "image_embeds"):
            out[name] = value.to(device=model.device, dtype=model.dtype)
        else:  # the tower's other inputs (SigLIP2: pixel_attention_mask (B, N), spatial_shapes (B, 2))
            out[name] = value.to(model.device)
    return out


@torch.no_grad()
def caption_batch(
    model: Any,
    processor: Any,
    *,
    images: list[Any] | None = None,
    pixel_values: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    image_inputs: Mapping[str, torch.Tensor] | None = None,
    **generation_kwargs: Any,
) -> list[str]:
    """One ``generate`` call on one batch and its decoding: the step :func:`caption_items` repeats.

    Args:
        model: a ClipCap model; inputs are moved to its device (and images to its dtype).
        processor: its ``ClipCapProcessor`` (``images`` -> ``pixel_values``; ``batch_decode``).
        images: decoded PIL images, turned into ``pixel_values`` (B, 3, H, W) by the processor, with every other
            tensor it returns (SigLIP2: ``pixel_attention_mask`` (B, N), ``spatial_shapes`` (B, 2)) passed on too;
            or give ``pixel_values`` (B, 3, H, W) or ``image_embeds`` (B, D) / (B, N, D) directly.
        image_inputs: model inputs as a mapping (a processor's full output, or the tower's other tensors next to
            ``pixel_values``).
        **generation_kwargs: passed to ``model.generate`` (``num_beams``, ``max_new_tokens``, ...).

    Returns:
        B * ``num_return_sequences`` captions, special tokens removed and white space collapsed.
    """
    inputs = dict(image_inputs or {})
    if images is not None:
        inputs.update(processor(images=images, return_tensors="pt"))
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    if image_embeds is not None:
        inputs["image_embeds"] = image_embeds
    output = model.generate(**_model_inputs(model, inputs), **generation_kwargs)  # (B, T) or .sequences
    sequences = output.sequences if hasattr(output, "sequences") else output
    if torch.is_tensor(inputs.get("input_ids")):  # a prompt (retrieved captions): keep only the continuation
        sequences = sequences[:, inputs["input_ids"].shape[1] :]
    return [" ".join(text.split()) for text in processor.batch_decode(sequences, skip_special_tokens=True)]


@dataclass
class _Item:
    """One input of :func:`caption_items` on its way: an image source to read, or precomputed model inputs."""

    id: Any
    name: str | None = None  # how error messages name it (default: load_image's description of the source)
    source: Any = None
    inputs: dict[str, torch.Tensor] | None = (
        None  # unbatched: image_embeds (D,) / (N, D), or pixel_values & co.
    )
    image: Any = None
    captions: list[str] = field(default_factory=list)
    error: str | None = None
    retrieved: list[str] | None = None  # captions retrieved for it (a retrieval-augmented model)

    @property
    def kind(self) -> str:
        if self.inputs is None:
            return "image"
        return "image_embeds" if "image_embeds" in self.inputs else "pixel_values"


def _as_item(position: int, item: Any) -> _Item:
    """A path (id: the path), a row with ``image_id`` (id: that), or any other image source (id: its position)."""
    if isinstance(item, Mapping) and "image_id" in item:
        image_id, name = item["image_id"], item.get("name")
        retrieved = item.get("retrieved_captions")
        if item.get("error") is not None:
            return _Item(image_id, name or str(image_id), error=str(item["error"]))
        if item.get("image_embeds") is not None:
            inputs = {"image_embeds": torch.as_tensor(item["image_embeds"])}
            return _Item(image_id, name, inputs=inputs, retrieved=retrieved)
        if item.get("pixel_values") is not None:
            tensors = {k: v for k, v in item.items() if torch.is_tensor(v)}
            return _Item(
                image_id,
                name,
                inputs=tensors | {"pixel_values": torch.as_tensor(item["pixel_values"])},
                retrieved=retrieved,
            )
        if "image" in item:
            return _Item(image_id, name, source=item["image"], retrieved=retrieved)
        raise ValueError(
            f"item {position} (image_id {image_id!r}) has no 'image', 'image_embeds' or 'pixel_values'; "
            f"it has {sorted(item)}."
        )
    if isinstance(item, (str, os.PathLike)):
        return _Item(str(item), source=item)
    return _Item(position, source=item)


def _batches(items: Iterable[Any], size: int) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    for position, item in enumerate(items):
        batch.append(_as_item(position, item))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_images(batch: list[_Item], policy: str, max_pixels: int | None) -> None:
    """Decode the batch's image files; a bad one raises (``"fail"``) or keeps its error (``"skip"``)."""
    for item in batch:
        if item.error is None and item.inputs is None:
            try:
                item.image = load_image(item.source, max_pixels=max_pixels, name=item.name)
            except ImageLoadError as err:
                if policy == "fail":
                    raise
                item.error = str(err)
        elif item.error is not None and policy == "fail":
            raise ImageLoadError(f"cannot read image {item.name}: {item.error}", source=item.name)


def _require_vision_tower(model: Any) -> None:
    if getattr(model, "vision_model", True) is None:
        raise ValueError(
            "this model has no vision tower (it was built with vision_config=None and takes only "
            "image_embeds); caption images with a model that includes its vision tower."
        )


@torch.no_grad()
def _caption_group(
    model: Any,
    processor: Any,
    group: list[_Item],
    policy: str,
    on_batch: BatchHook | None,
    generation_kwargs: dict[str, Any],
    datastore: Any = None,
) -> None:
    """Caption items of one kind in one ``generate`` call; the processor runs once on their images (and, for a
    retrieval-augmented model, turns their retrieved captions, or those ``datastore`` finds, into the prompt).

    When the call fails under ``"skip"``, the items are captioned one at a time, so only the image(s)
    responsible get the error.
    """
    try:
        images = None
        retrieval = _retrieval_kwargs(model, group, datastore)
        if group[0].inputs is None:
            images = [item.image for item in group]
            inputs = _model_inputs(model, processor(images=images, return_tensors="pt", **retrieval))
        else:  # precomputed per item: stack them back into (B, ...) tensors
            inputs = _model_inputs(
                model, {name: torch.stack([item.inputs[name] for item in group]) for name in group[0].inputs}
            )
            if retrieval:
                if "retrieved_captions" not in retrieval:
                    raise ValueError(
                        "precomputed image_embeds / pixel_values cannot be searched in a datastore: give each row "
                        "its 'retrieved_captions'."
                    )
                inputs.update(_model_inputs(model, processor(return_tensors="pt", **retrieval)))
        texts = caption_batch(model, processor, image_inputs=inputs, **generation_kwargs)
        if on_batch is not None:
            on_batch([item.id for item in group], inputs, images)
    except (ValueError, RuntimeError) as err:
        if policy == "fail":
            raise
        if len(group) == 1:
            group[0].error = f"captioning failed ({type(err).__name__}: {err})"
            return
        for item in group:
            _caption_group(model, processor, [item], policy, on_batch, generation_kwargs, datastore)
        return
    per_item = len(texts) // len(group)  # num_return_sequences
    for i, item in enumerate(group):
        item.captions = texts[i * per_item : (i + 1) * per_item]


def _retrieval_kwargs(model: Any, group: list[_Item], datastore: Any) -> dict[str, Any]:
    """The processor's retrieval arguments for ``group`` (empty for a model without retrieval): the items' own
    ``retrieved_captions`` when they all have them, else ``datastore`` retrieves."""
    k = getattr(model.config, "retrieval_k", 0)
    if not k:
        return {}
    settings = {"retrieval_k": k, "retrieval_template": model.config.retrieval_template}
    if all(item.retrieved is not None for item in group):
        return settings | {"retrieved_captions": [list(item.retrieved) for item in group]}
    if datastore is None:
        raise ValueError(
            f"this model is retrieval-augmented (config.retrieval_k = {k}): give a datastore to retrieve captions "
            "from (--datastore DIR, built by clipcap index), or rows with 'retrieved_captions'."
        )
    return settings | {"datastore": datastore}


def check_retrieval(model: Any, datastore: Any) -> None:
    """A retrieval-augmented model (``config.retrieval_k > 0``) needs a datastore (or captions retrieved for every
    item); one without retrieval takes none. Raises ``ValueError`` saying which."""
    k = getattr(model.config, "retrieval_k", 0)
    if datastore is not None and not k:
        raise ValueError(
            "this model was not trained with retrieval (config.retrieval_k = 0), so it cannot read a datastore; "
            "leave out --datastore, or train a model with --datastore and --retrieval_k."
        )
    if datastore is not None and len(datastore) < k:
        raise ValueError(
            f"the datastore holds {len(datastore)} captions but the model retrieves retrieval_k={k}; index more "
            "captions."
        )


def caption_items(
    model: Any,
    processor: Any,
    items: Iterable[Any],
    *,
    batch_size: int = 16,
    on_bad_image: str = "fail",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_batch: BatchHook | None = None,
    datastore: Any = None,
    **generation_kwargs: Any,
) -> Iterator[tuple[Any, list[str], str | None]]:
    """Caption images lazily, one batch at a time: the library's one captioning path.

    Args:
        model: a ``ClipCapForConditionalGeneration`` (put in eval mode while captioning, then back).
        processor: its ``ClipCapProcessor`` (run once per image; ``batch_decode``).
        items: an iterable, consumed one batch at a time, of

            * image files (``str`` / ``os.PathLike``; id: the path as a string),
            * rows with an ``image_id`` (the id) and one of: ``image`` (anything
              :func:`modeling_clipcap.image_io.load_image` reads), ``image_embeds`` ((D,) or (N, D): no image is
              read), or ``pixel_values`` with the tower's other tensors, unbatched (SigLIP2:
              ``pixel_attention_mask`` (N,), ``spatial_shapes`` (2,)); optionally ``name`` (how errors name the
              image) or ``error`` (a reason it is already known to be unusable, reported as is),
            * any other image source (PIL image, bytes, ``datasets`` image dict; id: its position in ``items``).
        batch_size: images per ``generate`` call; at most this many decoded images are held at once.
        on_bad_image: ``"fail"`` raises at an image that cannot be read or captioned (before anything of its
            batch is generated); ``"skip"`` reports it in its place and goes on
            (:func:`modeling_clipcap.image_io.check_bad_image_policy`).
        max_pixels: decompression-bomb limit of :func:`modeling_clipcap.image_io.load_image`.
        on_batch: called after each ``generate`` call as ``on_batch(ids, inputs, images)`` (:data:`BatchHook`),
            e.g. to read more from the same model inputs (the app's prefix tokens).
        datastore: for a retrieval-augmented model (``config.retrieval_k > 0``): a
            ``modeling_clipcap.retrieval.Datastore`` the processor retrieves each image's captions from (rows may
            instead carry their own ``retrieved_captions``); the prompt is cut from the returned captions. Default:
            ``processor.datastore`` when set (the app sets it).
        **generation_kwargs: passed to ``model.generate`` (``num_beams``, ``max_new_tokens``, ...).

    Yields:
        ``(id, captions, error)`` per item, in input order: ``captions`` holds ``num_return_sequences`` strings
        and ``error`` is ``None``; or, under ``"skip"``, ``captions == []`` and ``error`` names the image and says
        what was wrong.

    Raises:
        ValueError: ``batch_size`` or ``on_bad_image`` is invalid, or images are given to a model without a
            vision tower. ImageLoadError: under ``"fail"``, an image that cannot be read.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    policy = check_bad_image_policy(on_bad_image)
    if (
        datastore is None
    ):  # set by the app (or by hand) for every call: `processor.datastore = Datastore.load(DIR)`
        datastore = getattr(processor, "datastore", None)
    check_retrieval(model, datastore)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(items, batch_size):
            _read_images(batch, policy, max_pixels)
            groups: dict[str, list[_Item]] = {}
            for item in batch:
                if item.error is None:
                    groups.setdefault(item.kind, []).append(item)
            for kind, group in groups.items():
                if kind != "image_embeds":
                    _require_vision_tower(model)
                _caption_group(model, processor, group, policy, on_batch, generation_kwargs, datastore)
            for item in batch:
                yield item.id, item.captions, item.error
            del batch, groups  # nothing from this batch outlives it
    finally:
        model.train(was_training)


def caption_images(
    model: Any,
    processor: Any,
    paths: Iterable[str | os.PathLike | tuple[str, str | None]],
    batch_size: int = 16,
    datastore: Any = None,
    **generation_kwargs: Any,
) -> Iterator[tuple[str, str | None, str | None]]:
    """Caption image files lazily (:func:`caption_items` with ``on_bad_image="skip"``), one caption per file.

    Args:
        model: a ``ClipCapForConditionalGeneration`` with a vision tower.
        processor: its ``ClipCapProcessor``.
        paths: image paths (an iterable, consumed lazily), or ``(path, problem)`` pairs as produced by
            :func:`expand_inputs` (a pair with a problem is reported without being read).
        batch_size: images per ``generate`` call; at most this many decoded images are held at once.
        **generation_kwargs: passed to ``model.generate`` (``num_beams``, ``max_new_tokens``, ...).

    Yields:
        ``(path, caption, None)`` for every captioned image and ``(path, None, error)`` for every file that
        could not be read (the error names the file and says why), in input order.
    """

    def rows() -> Iterator[dict[str, Any]]:
        for item in paths:
            path, problem = item if isinstance(item, tuple) else (item, None)
            yield {"image_id": str(path), "image": path, "name": str(path), "error": problem}

    for path, captions, error in caption_items(
        model,
        processor,
        rows(),
        batch_size=batch_size,
        on_bad_image="skip",
        datastore=datastore,
        **generation_kwargs,
    ):
        yield path, (captions[0] if error is None else None), error


# ------------------------------------------------------------------------------------------ the model loader


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


def resolve_model_path(name_or_path: str | os.PathLike, flag: str = "--model") -> Path:
    """A local folder for ``name_or_path``: the path itself, or a Hugging Face Hub model id downloaded to the cache.

    Raises:
        CaptionInputError: the path does not exist and is not a Hub id, or the download failed; the message names
            ``flag`` and the input.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not _REPO_ID.match(name):
        raise CaptionInputError(
            f"{flag} {name}: no such folder (it does not exist here, so it is not a local model directory, and it "
            "is not a Hugging Face Hub model id either). Pass a folder written by save_pretrained (config.json, "
            "model.safetensors, processor and tokenizer files), or a Hub model id such as org/clipcap-coco."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name))
    except Exception as err:  # offline, unknown id, private repository without a token, ...
        raise CaptionInputError(
            f"{flag} {name} is not a local folder, and downloading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}). Check the model id (and HF_TOKEN for a private model), or pass "
            "a local folder."
        ) from err


#: ``--backend`` of ``clipcap caption``: PyTorch, or ONNX Runtime on a folder written by ``clipcap export``.
BACKENDS = ("pytorch", "onnx")


def _load_onnx_backend(
    path: Path, label: str, flag: str, backend: str | None, dtype: str, device: str | None, int8: bool
) -> tuple[Any, Any] | None:
    """:func:`load_captioner` for an ONNX export (model + processor), or ``None`` to load a PyTorch model."""
    from .onnx_runtime import OnnxExportError, is_onnx_export

    exported = is_onnx_export(path)
    if backend == "pytorch" and exported:
        raise CaptionInputError(
            f"{flag} {label} is an ONNX export (clipcap export), not a PyTorch model; caption it with --backend onnx."
        )
    if backend != "onnx" and not exported:
        if int8:
            raise CaptionInputError(
                "--int8 runs the int8 graphs of an ONNX export: write them with `clipcap export --model MODEL_DIR "
                "--output_dir EXPORT_DIR --int8`, then caption with --model EXPORT_DIR --backend onnx --int8."
            )
        return None
    if not exported:
        raise CaptionInputError(
            f"--backend onnx needs a folder written by `clipcap export`; {label} is not one. Export it first: "
            f"`clipcap export --model {label} --output_dir EXPORT_DIR`."
        )
    if dtype not in ("float32", "auto") or (device is not None and torch.device(device).type != "cpu"):
        raise CaptionInputError(
            f"the ONNX backend runs float32 (or --int8) on CPU; drop --dtype {dtype} / --device {device} "
            "(or use the PyTorch backend)."
        )
    from . import ClipCapProcessor
    from .onnx_runtime import ClipCapOnnxForConditionalGeneration

    try:
        model = ClipCapOnnxForConditionalGeneration.from_pretrained(path, int8=int8)
    except OnnxExportError as err:
        raise CaptionInputError(f"{flag} {label}: {err}") from err
    try:
        processor = ClipCapProcessor.from_pretrained(str(path))
    except Exception as err:
        raise CaptionInputError(
            f"cannot load the processor of the ONNX export {label} ({type(err).__name__}: {err}); export the model "
            "again."
        ) from err
    return model, processor


def load_captioner(
    name_or_path: str | os.PathLike,
    dtype: str = "float32",
    device: str | None = None,
    *,
    flag: str = "--model",
    backend: str | None = None,
    int8: bool = False,
) -> tuple[Any, Any]:
    """The one model loader of ``clipcap caption | evaluate | app``: model + processor, in eval mode on ``device``.

    Args:
        name_or_path: a folder written by ``save_pretrained`` (model and processor), or a Hub model id; or a folder
            written by ``clipcap export`` (ONNX graphs, run by ONNX Runtime on CPU).
        dtype: a name of :data:`DTYPES` (``bfloat16-vision``: only the image tower in bf16), or ``"auto"`` (the
            precision it was saved in).
        device: a torch device name (checked before any weights are read); default cuda if available, else cpu.
        flag: the command-line flag that gave ``name_or_path``, for error messages.
        backend: ``"pytorch"`` or ``"onnx"`` (:data:`BACKENDS`); default: ``"onnx"`` for an exported folder, else
            ``"pytorch"``.
        int8: run the export's int8 graphs (ONNX backend; the folder must be exported with ``--int8``).

    Raises:
        CaptionInputError: the device, dtype or backend is unusable, the folder or id cannot be found, lacks files, or
            cannot be loaded, or the model has no vision tower; the message names the input and says what to do.
    """
    torch_device = resolve_device(device)  # before any weights are read
    if dtype not in DTYPES and dtype != "auto":
        raise CaptionInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if backend is not None and backend not in BACKENDS:
        raise CaptionInputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    from . import ClipCapForConditionalGeneration, ClipCapProcessor

    path = resolve_model_path(name_or_path, flag)
    label = str(path) if path == Path(name_or_path).expanduser() else f"{name_or_path} (downloaded to {path})"
    if not path.is_dir():
        raise CaptionInputError(f"{flag} {label} is a file; pass the folder that contains config.json.")
    onnx_model = _load_onnx_backend(path, label, flag, backend, dtype, device, int8)
    if onnx_model is not None:
        return onnx_model
    if not (path / "config.json").is_file():
        raise CaptionInputError(
            f"model folder {label} has no config.json; pass a folder written by save_pretrained "
            "(a training run's final output folder)."
        )
    try:
        model = ClipCapForConditionalGeneration.from_pretrained(str(path), dtype=DTYPES.get(dtype, "auto"))
        if dtype == "bfloat16-vision" and model.vision_model is not None:
            model.vision_model.to(torch.bfloat16)
    except Exception as err:  # any loading failure becomes one clear line
        raise CaptionInputError(
            f"cannot load the model in {label} ({type(err).__name__}: {err}). Check that it was saved by "
            "ClipCapForConditionalGeneration.save_pretrained and is complete."
        ) from err
    try:
        processor = ClipCapProcessor.from_pretrained(str(path))
    except Exception as err:
        raise CaptionInputError(
            f"cannot load the processor (image processor + tokenizer) in {label} ({type(err).__name__}: "
            f"{err}). Save it next to the model with processor.save_pretrained({str(path)!r})."
        ) from err
    if model.vision_model is None:
        raise CaptionInputError(
            f"the model in {label} has no vision tower (image_embeds only), so it cannot caption image files."
        )
    model.to(torch_device).eval()
    return model, processor


# ------------------------------------------------------------------------------------------ clipcap caption


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``clipcap caption``."""
    from .cli import add_bool_argument, add_renamed_argument

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
    # switches without a true|false value: a flag taking one would swallow an image path after it
    add_bool_argument(
        parser,
        "json",
        takes_value=False,
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
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="pytorch, or onnx for a folder written by `clipcap export` (ONNX Runtime, CPU); default: onnx for an "
        "exported folder, else pytorch",
    )
    add_bool_argument(
        parser,
        "int8",
        takes_value=False,
        help="run the int8 graphs of an ONNX export (written by `clipcap export --int8`)",
    )
    parser.add_argument(
        "--datastore", default=None, help="retrieval datastore (clipcap index) of a retrieval-augmented model"
    )
    add_bool_argument(
        parser,
        "progress",
        default=True,
        takes_value=False,
        help="progress bars on stderr (model loading, images)",
    )
    add_renamed_argument(parser, "--quiet", "--no_progress")


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
    if not args.progress:
        hf_logging.disable_progress_bar()  # no "Loading weights" bar either
    try:
        model, processor = load_captioner(
            args.model, dtype=args.dtype, device=args.device, backend=args.backend, int8=args.int8
        )
        datastore = None
        if getattr(args, "datastore", None):
            from .retrieval import Datastore

            datastore = Datastore.load(args.datastore)
        if getattr(model.config, "retrieval_k", 0) and datastore is None:
            raise CaptionInputError(
                f"{args.model} is retrieval-augmented (retrieval_k={model.config.retrieval_k}): pass --datastore DIR "
                "(built by clipcap index)."
            )
        check_retrieval(model, datastore)
    except (CaptionInputError, ValueError) as err:
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
    progress = tqdm(
        total=len(items), desc="captioning", unit="img", file=sys.stderr, disable=not args.progress
    )
    try:
        for path, caption, error in caption_images(
            model, processor, items, batch_size=args.batch_size, datastore=datastore, **generation_kwargs
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
