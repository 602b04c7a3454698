"""``clipcap export``: a saved ClipCap model -> ONNX graphs that ONNX Runtime captions with, without PyTorch.

The exported folder holds three graphs, written by ``torch.onnx.export`` (the dynamo exporter) from the model's own
modules, and everything else captioning needs:

* ``image_encoder.onnx``: ``pixel_values`` (B, 3, H, W) -> ``prefix_embeds`` (B, K, E): the image tower and the
  mapping network (``ClipCapForConditionalGeneration.get_prefix``).
* ``embed_tokens.onnx``: ``input_ids`` (B, S) -> ``inputs_embeds`` (B, S, E): the language model's input embeddings.
* ``decoder.onnx``: ``inputs_embeds`` (B, S, E), ``attention_mask`` (B, P + S), ``position_ids`` (B, S) and
  ``past.{i}.key`` / ``past.{i}.value`` (B, H, P, D) per layer -> ``logits`` (B, 1, V) of the last position and
  ``new.{i}.key`` / ``new.{i}.value`` (B, H, S, D): the key/values of the S new positions (P = 0 at the first step).
* With ``--int8``: ``image_encoder.int8.onnx`` and ``decoder.int8.onnx``, ONNX Runtime's dynamic int8 quantization
  of their matrix products (``onnxruntime.quantization.quantize_dynamic``, per-channel weight scales).
* ``config.json``, ``generation_config.json``, the processor and tokenizer files, and ``onnx_manifest.json``:
  the versions that wrote it, each graph's input and output names, size and SHA-256, and the cache layout, so a
  missing, truncated or mismatched graph is refused with a clear error when the folder is loaded
  (:mod:`modeling_clipcap.onnx_runtime`).

Command line::

    clipcap export --model path/to/clipcap-model --output_dir path/to/clipcap-onnx [--int8]
    clipcap caption photos/ --model path/to/clipcap-onnx --backend onnx [--int8]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import cache_kwargs, output_cache

__all__ = [
    "MANIFEST_NAME",
    "ExportError",
    "add_int8_graphs",
    "add_cli_arguments",
    "cli_main",
    "export_onnx",
    "file_sha256",
]

MANIFEST_NAME = "onnx_manifest.json"
FORMAT = "clipcap-onnx"
FORMAT_VERSION = 1
#: graph name -> file (fp32); the int8 twins are ``<name>.int8.onnx``.
GRAPHS = {
    "image_encoder": "image_encoder.onnx",
    "embed_tokens": "embed_tokens.onnx",
    "decoder": "decoder.onnx",
}
INT8_GRAPHS = {"image_encoder": "image_encoder.int8.onnx", "decoder": "decoder.int8.onnx"}
OPSET = 18


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to do."""


# ------------------------------------------------------------------ the modules that are exported


class _ImageEncoder(nn.Module):
    """pixel_values (B, 3, H, W) -> prefix (B, K, E), as ``generate`` computes it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # ClipCapModel.encode_images without its input checks, whose data-dependent tests (finite values) cannot
        # be traced; the runtime runs the same checks (towers.check_pixel_values) before the graph
        config = self.model.config
        tower = self.model.get_image_embeddings(pixel_values)
        embeds = tower.last_hidden_state if config.mapping_input == "tokens" else tower.pooler_output
        if config.normalize_prefix:
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
        prefix = self.model.mapping_network(embeds)  # (B, K, E)
        return prefix.to(self.model.get_input_embeddings().weight.dtype)


class _EmbedTokens(nn.Module):
    """input_ids (B, S) -> inputs_embeds (B, S, E)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)


class _Decoder(nn.Module):
    """One cached decoding step of the language model, with the cache as flat tensors.

    ``forward(inputs_embeds (B, S, E), attention_mask (B, P + S), position_ids (B, S), *past)`` with ``past`` =
    key (B, H, P, D), value (B, H, P, D) of each layer; returns the last position's logits (B, 1, V) and the key /
    value (B, H, S, D) of each layer's S new positions. The cache is a transformers ``DynamicCache`` inside.
    """

    def __init__(self, language_model: nn.Module):
        super().__init__()
        self.language_model = language_model

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
            **cache_kwargs(cache),
        )
        new = inputs_embeds.shape[1]
        flat = []
        for layer in output_cache(outputs).layers:
            flat += [layer.keys[:, :, -new:], layer.values[:, :, -new:]]
        return (outputs.logits, *flat)


# ------------------------------------------------------------------ export


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_layout(model: nn.Module, lm_dtype: torch.dtype) -> dict[str, int]:
    """Layers, key/value heads and head size of the LM's cache, read from a real one-token forward."""
    from transformers import DynamicCache

    text_config = model.config.text_config
    if any(DynamicCache(config=text_config).is_sliding):
        raise ExportError(
            f"this model's language model ({text_config.model_type}) uses sliding-window attention layers, which "
            "the ONNX export does not support yet; caption it with the PyTorch backend."
        )
    embeds = torch.zeros(1, 1, model.get_input_embeddings().weight.shape[1], dtype=lm_dtype)
    with torch.no_grad():
        out = model.language_model(inputs_embeds=embeds, use_cache=True, return_dict=True)
    layers = output_cache(out).layers
    _, heads, _, head_dim = layers[0].keys.shape
    return {"num_layers": len(layers), "num_key_value_heads": int(heads), "head_dim": int(head_dim)}


def _torch_export(module: nn.Module, args: tuple, path: Path, names: dict[str, Any], quiet: bool) -> None:
    """``torch.onnx.export`` with the dynamo exporter; its progress lines go away when ``quiet``."""
    sink = io.StringIO()
    # the exporter's notes: axis names, pytree internals, torchvision's operators it could not register
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with (
        contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_shapes=names["dynamic_shapes"],
            optimize=True,
            verbose=False,
        )
        program.save(str(path))
    registration.setLevel(level)


def _example_image(vision_config: Any, processor: Any) -> tuple[int, tuple[int, int], bool]:
    """(channels, (H, W), square) of the example image the graph is traced with: the size the processor makes
    (else the config's ``image_size``, else 224); ``square``: the tower takes one fixed size (ViT-like), else
    (CNNs) height and width stay dynamic axes of the graph."""
    from .towers import vision_family

    crop = getattr(getattr(processor, "image_processor", None), "crop_size", None) or {}
    side = getattr(vision_config, "image_size", None) or 224
    side = side[0] if isinstance(side, (list, tuple)) else side
    size = (crop.get("height", side), crop.get("width", side))
    square = vision_family(vision_config).pixels == "square"
    if square:
        size = (side, side)
    return getattr(vision_config, "num_channels", 3), size, square


def _export_graphs(
    model: nn.Module, processor: Any, out: Path, layout: dict[str, int], quiet: bool
) -> dict[str, dict]:
    """Write the three fp32 graphs; returns their manifest entries (without hashes)."""
    channels, size, square = _example_image(model.config.vision_config, processor)
    embed_dim = model.get_input_embeddings().weight.shape[1]
    batch, seq, past_len = 2, 3, 4  # distinct sizes, so the exporter keeps the axes apart
    entries: dict[str, dict] = {}

    pixel_values = torch.randn(batch, channels, *size)
    pixel_axes = {0: "batch"} if square else {0: "batch", 2: "height", 3: "width"}
    names = {
        "inputs": ["pixel_values"],
        "outputs": ["prefix_embeds"],
        "dynamic_shapes": {"pixel_values": pixel_axes},
    }
    _torch_export(_ImageEncoder(model), (pixel_values,), out / GRAPHS["image_encoder"], names, quiet)
    entries["image_encoder"] = {"inputs": names["inputs"], "outputs": names["outputs"]}

    names = {
        "inputs": ["input_ids"],
        "outputs": ["inputs_embeds"],
        "dynamic_shapes": {"input_ids": {0: "batch", 1: "sequence"}},
    }
    ids = torch.ones(batch, seq, dtype=torch.long)
    _torch_export(
        _EmbedTokens(model.get_input_embeddings()), (ids,), out / GRAPHS["embed_tokens"], names, quiet
    )
    entries["embed_tokens"] = {"inputs": names["inputs"], "outputs": names["outputs"]}

    kv_names = [f"{{}}.{i}.{kv}" for i in range(layout["num_layers"]) for kv in ("key", "value")]
    past = tuple(
        torch.randn(batch, layout["num_key_value_heads"], past_len, layout["head_dim"]) for _ in kv_names
    )
    names = {
        "inputs": ["inputs_embeds", "attention_mask", "position_ids", *(n.format("past") for n in kv_names)],
        "outputs": ["logits", *(n.format("new") for n in kv_names)],
        "dynamic_shapes": {
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "past": tuple({0: "batch", 2: "past_sequence"} for _ in kv_names),
        },
    }
    args = (
        torch.randn(batch, seq, embed_dim),
        torch.ones(batch, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq).expand(batch, -1),
        *past,
    )
    _torch_export(_Decoder(model.language_model), args, out / GRAPHS["decoder"], names, quiet)
    entries["decoder"] = {"inputs": names["inputs"], "outputs": names["outputs"]}
    return entries


#: How ``--int8`` quantizes (onnxruntime ``quantize_dynamic``): int8 weights with one scale per output channel
#: (per-tensor scales kept fewer captions of the demo model: docs/performance.md), activations quantized per call.
INT8_SETTINGS = {"weight_type": "QInt8", "per_channel": True, "op_types_to_quantize": ["MatMul", "Gemm"]}


def add_int8_graphs(folder: str | os.PathLike) -> None:
    """Write the int8 twins of an export's image encoder and decoder (``INT8_SETTINGS``) and list them in its
    manifest (replacing earlier ones): what ``export_onnx(..., int8=True)`` does after the fp32 graphs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(folder)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    settings = {**INT8_SETTINGS, "weight_type": getattr(QuantType, INT8_SETTINGS["weight_type"])}
    for name, file in INT8_GRAPHS.items():
        quantize_dynamic(out / GRAPHS[name], out / file, **settings)
        entry = {**manifest["graphs"][name], "file": file}
        manifest["int8_graphs"][name] = _described(out, entry)
    manifest["int8_settings"] = INT8_SETTINGS
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _check_exportable(model: nn.Module) -> None:
    config = model.config
    if model.vision_model is None:
        raise ExportError(
            "this model has no vision tower (it takes image_embeds only); the ONNX export captions images, so "
            "export a model that includes its tower."
        )
    if config.vision_config.model_type == "siglip2_vision_model":
        raise ExportError(
            "SigLIP2 towers (NaFlex patches with pixel_attention_mask / spatial_shapes) are not supported by the "
            "ONNX export; caption this model with the PyTorch backend."
        )


#: what ``pip install "modeling_clipcap[onnx]"`` adds: the exporter's and the runtime's packages
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require_onnx_packages(error: type[Exception] = ImportError) -> None:
    """Raise ``error`` naming the missing packages and the extra to install when the ONNX packages are missing."""
    import importlib.util

    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise error(
            f"the ONNX export and runtime need {', '.join(missing)}, which are not installed: "
            'pip install "modeling_clipcap[onnx]".'
        )


def export_onnx(
    model: str | os.PathLike | nn.Module,
    output_dir: str | os.PathLike,
    *,
    processor: Any = None,
    int8: bool = False,
    progress: bool = True,
) -> Path:
    """Export a ClipCap model to ONNX graphs plus everything captioning needs (see the module docstring).

    Args:
        model: a folder written by ``save_pretrained`` (model and processor), or a
            ``ClipCapForConditionalGeneration`` (then give its ``processor``).
        output_dir: the folder to write (created; existing export files in it are replaced).
        processor: the model's ``ClipCapProcessor`` when ``model`` is a module (without one, no processor files are
            written: the graphs run, but ``clipcap caption`` needs the processor beside them).
        int8: also write ONNX Runtime dynamic int8 twins of the image encoder and the decoder.
        progress: print one line per step on stderr.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        ExportError: the model cannot be exported (no vision tower, SigLIP2, sliding-window attention).
    """
    from . import ClipCapForConditionalGeneration, ClipCapProcessor

    require_onnx_packages(ExportError)

    def say(message: str) -> None:
        if progress:
            print(f"clipcap export: {message}", file=sys.stderr, flush=True)

    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        if source.resolve() == Path(output_dir).resolve():
            raise ExportError(
                f"--output_dir {output_dir} is the model folder itself; export to another folder (the export "
                "writes its own config.json and processor files)."
            )
        if not (source / "config.json").is_file():
            raise ExportError(
                f"--model {source}: no config.json there; pass a folder written by save_pretrained."
            )
        model_obj = ClipCapForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32)
        processor = processor or ClipCapProcessor.from_pretrained(str(source))
    else:
        model_obj = model
    _check_exportable(model_obj)
    was_training = model_obj.training
    model_obj.eval()
    original_dtype = next(model_obj.parameters()).dtype
    model_obj.float()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        layout = _cache_layout(model_obj, torch.float32)
        say("exporting the image encoder, token embeddings and decoder (torch.onnx, dynamo exporter)")
        with torch.no_grad():
            entries = _export_graphs(model_obj, processor, out, layout, quiet=not progress)
    finally:
        model_obj.to(original_dtype).train(was_training)
    for name, file in GRAPHS.items():
        entries[name]["file"] = file
    for file in INT8_GRAPHS.values():  # a stale int8 twin from an earlier export would not match
        if (out / file).exists():
            (out / file).unlink()
    say("writing config, generation config, processor and manifest")
    model_obj.config.save_pretrained(out)
    model_obj.generation_config.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    _write_manifest(out, entries, layout, model_obj)
    if int8:
        say("quantizing the image encoder and decoder to int8 (onnxruntime quantize_dynamic)")
        add_int8_graphs(out)
    say(f"done: {out}")
    return out


def _described(out: Path, entry: dict) -> dict:
    """A graph's manifest entry with its file's size and SHA-256."""
    path = out / entry["file"]
    return {**entry, "size": path.stat().st_size, "sha256": file_sha256(path)}


def _write_manifest(out: Path, entries: dict[str, dict], layout: dict[str, int], model: nn.Module) -> None:
    import onnx
    import onnxruntime
    import transformers

    from . import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_with": {
            "modeling_clipcap": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": OPSET,
        },
        "prefix_length": model.config.prefix_length,
        "cache": layout,
        "graphs": {name: _described(out, entry) for name, entry in entries.items()},
        "int8_graphs": {},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------ clipcap export


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``clipcap export``."""
    from .cli import add_bool_argument

    parser.add_argument("--model", required=True, help="a saved ClipCap model folder (save_pretrained)")
    parser.add_argument("--output_dir", required=True, help="the folder to write the ONNX export to")
    add_bool_argument(
        parser,
        "int8",
        help="also write ONNX Runtime dynamic int8 graphs (clipcap caption --backend onnx --int8 uses them)",
    )
    add_bool_argument(parser, "progress", default=True, help="one line per step on stderr")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``clipcap export``. Returns 0 on success, 2 for an unusable model folder."""
    from .captioning import CaptionInputError, resolve_model_path

    try:
        source = resolve_model_path(args.model)
        export_onnx(source, args.output_dir, int8=args.int8, progress=args.progress)
    except (CaptionInputError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
