"""Convert the original ClipCap checkpoints (rmokady/CLIP_prefix_caption) to this package's format.

The original repository released ``torch.save(model.state_dict())`` pickles: ``coco_weights.pt`` and
``conceptual_weights.pt`` (MLP mapper, prefix 10, fine-tuned GPT-2, CLIP ViT-B/32 embeddings) and
``transformer_weights.pt`` (transformer mapper, prefix 40, clip_length 40, 8 layers, frozen GPT-2, CLIP
RN50x4 embeddings of width 640, L2-normalised). This module turns one of them into a complete model
directory of this package (safetensors weights, config, generation config, processor files, the code files
for ``trust_remote_code`` and a model card), optionally pushed to the Hugging Face Hub.

Python::

    from modeling_clipcap.convert_original import convert_original_checkpoint
    model = convert_original_checkpoint("coco_weights.pt", "clipcap-coco-mlp", preset="clipcap-coco-mlp",
                                        vision_model="path/to/clip-vit-base-patch32", text_model="path/to/gpt2")

Command line::

    clipcap convert --preset clipcap-coco-mlp --checkpoint coco_weights.pt --output_dir clipcap-coco-mlp \\
        --vision_model path/to/clip-vit-base-patch32 --text_model path/to/gpt2

Key mapping (original -> this package)::

    clip_project.model.{0,2}.*                        -> mapping_network.layers.{0,2}.*           (MLP)
    clip_project.linear.*                             -> mapping_network.linear.*                 (transformer)
    clip_project.prefix_const                         -> mapping_network.prefix_const
    clip_project.transformer.layers.{i}.norm1.*       -> mapping_network.layers.{i}.norm1.*
    clip_project.transformer.layers.{i}.attn.to_queries.weight     -> ...attn.q_proj.weight
    clip_project.transformer.layers.{i}.attn.to_keys_values.weight -> ...attn.kv_proj.weight  (keys, then values)
    clip_project.transformer.layers.{i}.attn.project.*             -> ...attn.out_proj.*
    clip_project.transformer.layers.{i}.{norm2,mlp.fc1,mlp.fc2}.*  -> mapping_network.layers.{i}.(same)
    gpt.transformer.* / gpt.lm_head.weight            -> language_model.transformer.* / lm_head (tied to wte)
    gpt.transformer.h.{n}.attn.{bias,masked_bias}     -> dropped (causal-mask buffers of old transformers)

The checkpoint is read with ``torch.load(weights_only=True)`` only: a pickle that would run code is refused.
Any missing, unexpected or mis-shaped key stops the conversion with an error that lists them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .configuration_clipcap import ClipCapConfig
from .hub import push_folder, render_conversion_card
from .modeling_clipcap import ClipCapForConditionalGeneration
from .presets import find_preset, read_preset

logger = logging.getLogger(__name__)

GPT2_STOP_TOKEN_ID = 13
"""GPT-2's id of "." : the original decoding stops on it."""

_CONFIG_FIELDS = (
    "mapping_type",
    "prefix_length",
    "clip_length",
    "mapping_num_layers",
    "mapping_num_heads",
    "mapping_mlp_ratio",
    "mapping_hidden_size",
    "image_embed_dim",
    "normalize_prefix",
    "freeze_vision",
    "freeze_language_model",
)

_DEFAULTS: dict[str, Any] = {
    "mapping_type": None,
    "prefix_length": 10,
    "clip_length": None,  # defaults to prefix_length for the transformer mapper (as --prefix_length_clip 10)
    "mapping_num_layers": 8,
    "mapping_num_heads": 8,
    "mapping_mlp_ratio": 2.0,
    "mapping_hidden_size": None,
    "image_embed_dim": None,
    "normalize_prefix": False,
    "freeze_vision": True,
    "freeze_language_model": None,  # mlp: fine-tuned GPT-2; transformer: frozen (the released recipes)
}

# The original decoding: beam search of 5 whose scores are divided by the length (length_penalty 1), 67 tokens.
_GENERATION_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 5,
    "max_new_tokens": 67,
    "length_penalty": 1.0,
}

_DROPPED_KEY = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_TRANSFORMER_LAYER_KEY = re.compile(r"^clip_project\.transformer\.layers\.(\d+)\.(.+)$")
_TRANSFORMER_LAYER_RENAMES = {
    "attn.to_queries.weight": "attn.q_proj.weight",
    "attn.to_keys_values.weight": "attn.kv_proj.weight",
    "attn.project.weight": "attn.out_proj.weight",
    "attn.project.bias": "attn.out_proj.bias",
}
_TRANSFORMER_LAYER_SAME = (
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


class ConversionError(ValueError):
    """An original checkpoint (or the settings given with it) cannot be converted; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------


def _read_conversion_preset(preset: str | os.PathLike) -> dict[str, Any]:
    """The preset folder ``preset`` (a name under ``hub_configs/`` or a path, found by
    :func:`modeling_clipcap.presets.find_preset`) parsed by :func:`~modeling_clipcap.presets.read_preset`;
    ``name`` is ``preset`` as given (``conversion_info.json`` records it). Its ``config.json`` may hold only
    ClipCap fields this converter sets."""
    try:
        files = read_preset(find_preset(preset))
    except (FileNotFoundError, ValueError) as err:  # no such folder, or a file that is not JSON (named)
        raise ConversionError(f"--preset {err}") from err
    unknown = sorted(
        set(files["config"]) - set(_CONFIG_FIELDS) - {"model_type", "vision_config", "text_config"}
    )
    if unknown:
        raise ConversionError(
            f"{files['dir'] / 'config.json'} has fields this converter does not know: {unknown}."
        )
    return files | {"name": Path(preset).name}


# ---------------------------------------------------------------------------------------------------------
# Reading and mapping the original state dict
# ---------------------------------------------------------------------------------------------------------


def load_original_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an original ``torch.save(state_dict)`` file safely (``weights_only=True``, never a full unpickle).

    Returns a dict of key -> tensor on CPU. Raises :class:`ConversionError` when the file is missing, holds
    anything but tensors (a pickle that would execute code is refused, not run), or is not a state dict.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConversionError(f"Checkpoint {path} does not exist (or is not a file).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
        raise ConversionError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint that torch.load(weights_only=True) "
            f"accepts ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). The converter "
            "never unpickles arbitrary objects, as that can execute code. Original ClipCap checkpoints are "
            "plain state dicts; re-save a trusted file with torch.save(model.state_dict(), path)."
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of tensors)."
        )
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v))
    if bad:
        raise ConversionError(f"{path}: these entries are not named tensors: {bad[:20]}")
    return {k: v for k, v in obj.items()}


def describe_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Settings an original state dict appears to have, read off its key names and shapes (for hints)."""
    info: dict[str, Any] = {}
    wte = state_dict.get("gpt.transformer.wte.weight")
    width = None
    if wte is not None and wte.ndim == 2:
        info["vocab_size"], width = int(wte.shape[0]), int(wte.shape[1])
        info["n_embd"] = width
    wpe = state_dict.get("gpt.transformer.wpe.weight")
    if wpe is not None and wpe.ndim == 2:
        info["n_positions"] = int(wpe.shape[0])
    gpt_layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"^gpt\.transformer\.h\.(\d+)\.", k))}
    if gpt_layers:
        info["n_layer"] = max(gpt_layers) + 1
    first = state_dict.get("clip_project.model.0.weight")
    last = state_dict.get("clip_project.model.2.weight")
    if first is not None and first.ndim == 2:
        info["mapping_type"] = "mlp"
        info["image_embed_dim"] = int(first.shape[1])
        if last is not None and last.ndim == 2 and width:
            info["prefix_length"] = int(last.shape[0]) // width
    linear = state_dict.get("clip_project.linear.weight")
    if linear is not None and linear.ndim == 2:
        info["mapping_type"] = "transformer"
        info["image_embed_dim"] = int(linear.shape[1])
        if width:
            info["clip_length"] = int(linear.shape[0]) // width
        const = state_dict.get("clip_project.prefix_const")
        if const is not None and const.ndim == 2:
            info["prefix_length"] = int(const.shape[0])
        layers = {int(m.group(1)) for k in state_dict if (m := _TRANSFORMER_LAYER_KEY.match(k))}
        if layers:
            info["mapping_num_layers"] = max(layers) + 1
    return info


def map_original_key(key: str, mapping_type: str) -> str | None:
    """This package's name of an original key, ``""`` for a key to drop, ``None`` for an unknown key."""
    if _DROPPED_KEY.match(key):
        return ""
    if key.startswith("gpt.transformer.") or key == "gpt.lm_head.weight":
        return "language_model." + key[len("gpt.") :]
    if mapping_type == "mlp":
        m = re.match(r"^clip_project\.model\.([02])\.(weight|bias)$", key)
        return f"mapping_network.layers.{m.group(1)}.{m.group(2)}" if m else None
    if key in ("clip_project.linear.weight", "clip_project.linear.bias"):
        return "mapping_network." + key[len("clip_project.") :]
    if key == "clip_project.prefix_const":
        return "mapping_network.prefix_const"
    m = _TRANSFORMER_LAYER_KEY.match(key)
    if m:
        index, rest = m.groups()
        if rest in _TRANSFORMER_LAYER_RENAMES:
            return f"mapping_network.layers.{index}.{_TRANSFORMER_LAYER_RENAMES[rest]}"
        if rest in _TRANSFORMER_LAYER_SAME:
            return f"mapping_network.layers.{index}.{rest}"
    return None


def _expected_original_key(our_key: str) -> str:
    """Inverse of :func:`map_original_key` for messages: the original name of one of our keys."""
    if our_key.startswith("language_model."):
        return "gpt." + our_key[len("language_model.") :]
    m = re.match(r"^mapping_network\.layers\.([02])\.(weight|bias)$", our_key)
    if m and "attn" not in our_key:
        return f"clip_project.model.{m.group(1)}.{m.group(2)}"
    m = re.match(r"^mapping_network\.layers\.(\d+)\.(.+)$", our_key)
    if m:
        inverse = {v: k for k, v in _TRANSFORMER_LAYER_RENAMES.items()}
        return f"clip_project.transformer.layers.{m.group(1)}.{inverse.get(m.group(2), m.group(2))}"
    return "clip_project." + our_key[len("mapping_network.") :]


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: ClipCapForConditionalGeneration
) -> dict[str, torch.Tensor]:
    """Rename an original state dict to ``model``'s mapping network + language model keys, checking everything.

    Every original key must map to a parameter of ``model`` with the same shape, and every parameter of the
    mapping network and GPT-2 must be provided (``gpt.lm_head.weight`` may be absent: it is tied to
    ``wte``; when present it must equal ``wte``). Returns the renamed state dict (our key -> tensor,
    including ``language_model.lm_head.weight``). Raises :class:`ConversionError` listing every missing,
    unexpected and mis-shaped key, with the settings the checkpoint appears to have.
    """
    mapping_type = model.config.mapping_type
    ours = {  # checkpoint names (the saved layout): the mapping network lives under the base model ``model.``
        k.removeprefix("model."): v
        for k, v in model.state_dict().items()
        if k.startswith("model.mapping_network.") or k.startswith("language_model.")
    }
    renamed: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    mismatched_targets: set[str] = set()
    dropped = 0
    for key, tensor in state_dict.items():
        target = map_original_key(key, mapping_type)
        if target == "":
            dropped += 1
            continue
        if target is None or target not in ours:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(ours[target].shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(tensor.shape)}, expected {tuple(ours[target].shape)} (-> {target})"
            )
            mismatched_targets.add(target)
            continue
        renamed[target] = tensor
    head, wte = "language_model.lm_head.weight", "language_model.transformer.wte.weight"
    missing = [
        f"{_expected_original_key(k)} (-> {k})"
        for k in ours
        if k not in renamed and k != head and k not in mismatched_targets
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if mismatched:
        problems.append(f"mis-shaped keys ({len(mismatched)}): " + "; ".join(mismatched))
    if problems:
        looks = describe_checkpoint(state_dict)
        expected = {
            "mapping_type": mapping_type,
            "prefix_length": model.config.prefix_length,
            "image_embed_dim": model.config.image_embed_dim,
            "n_embd": model.config.text_config.n_embd,
            "vocab_size": model.config.text_config.vocab_size,
            "n_positions": model.config.text_config.n_positions,
            "n_layer": model.config.text_config.n_layer,
        }
        if mapping_type == "transformer":
            expected.update(
                clip_length=model.config.clip_length, mapping_num_layers=model.config.mapping_num_layers
            )
        raise ConversionError(
            "The checkpoint does not match the model it is converted to:\n  - "
            + "\n  - ".join(problems)
            + f"\nThe model expects {expected};\nthe checkpoint looks like {looks}.\n"
            "Fix the settings (--preset / --mapping_type / --prefix_length / --clip_length / --mapping_num_layers / "
            "--image_embed_dim / --vision_model / --text_model) or use the right checkpoint."
        )
    if "gpt.lm_head.weight" in state_dict:
        lm_head = state_dict["gpt.lm_head.weight"]
        if not torch.equal(lm_head, renamed[wte]):
            raise ConversionError(
                "gpt.lm_head.weight differs from gpt.transformer.wte.weight: this model ties GPT-2's output "
                "layer to its input embeddings, as the original GPT2LMHeadModel does; an untied head cannot "
                "be converted."
            )
    renamed[head] = renamed[wte]
    logger.info("Mapped %d keys, dropped %d obsolete attention-mask buffers.", len(renamed) - 1, dropped)
    return renamed


# ---------------------------------------------------------------------------------------------------------
# Building the model around the checkpoint
# ---------------------------------------------------------------------------------------------------------


def _load_text_parts(text_model: str | os.PathLike | None) -> tuple[Any, Any]:
    """GPT-2 config (GPT-2 small when ``text_model`` is None) and the tokenizer of ``text_model`` if it has one."""
    from transformers import AutoTokenizer, GPT2Config

    if text_model is None:
        return GPT2Config(), None
    path = Path(text_model)
    if not (path / "config.json").is_file():
        raise ConversionError(
            f"--text_model {path} must be a local GPT-2 checkpoint folder with a config.json "
            "(e.g. a download of openai-community/gpt2)."
        )
    config = GPT2Config.from_pretrained(path)
    if config.model_type != "gpt2":
        raise ConversionError(f"--text_model {path} is a {config.model_type!r} model, not GPT-2.")
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConversionError(f"Could not load the tokenizer in {path}: {err}") from err
    return config, tokenizer


def _load_vision_parts(vision_model: str | os.PathLike) -> tuple[Any, Any]:
    """CLIP vision tower with projection from a full CLIP or CLIP-vision folder, and its image processor.

    Returns ``(CLIPVisionModelWithProjection, image_processor)``. Refuses a folder whose vision weights are
    incomplete (nothing is randomly initialised).
    """
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    path = Path(vision_model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(
            f"--vision_model {path} must be a local CLIP (or CLIP vision) checkpoint folder with a config.json "
            "(e.g. a download of openai/clip-vit-base-patch32)."
        )
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type == "clip":
        full = CLIPConfig.from_pretrained(path)
        vision_config = full.vision_config
        vision_config.projection_dim = full.projection_dim  # the projection width lives on the full config
    elif model_type == "clip_vision_model":
        vision_config = CLIPVisionConfig.from_pretrained(path)
    else:
        raise ConversionError(f"--vision_model {path} is a {model_type!r} model, not CLIP.")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's keys of a full CLIP are expectedly unused
    try:
        tower, info = CLIPVisionModelWithProjection.from_pretrained(
            path, config=vision_config, output_loading_info=True
        )
    except (OSError, RuntimeError) as err:
        raise ConversionError(f"Could not load the CLIP vision weights of {path}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ConversionError(
            f"--vision_model {path} lacks CLIP vision weights: missing {sorted(info.get('missing_keys') or [])}, "
            f"mis-shaped {sorted(info.get('mismatched_keys') or [])}."
        )
    return tower, _load_image_processor(path, vision_config.image_size)


def _load_image_processor(path: Path, image_size: int) -> Any:
    """The image processor saved with the CLIP checkpoint, or CLIP's standard one for ``image_size``."""
    from transformers import AutoImageProcessor

    if (path / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConversionError(f"Could not load the image processor in {path}: {err}") from err
    try:  # the torchvision-backed processor when available, else the PIL one (same maths)
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as _Processor
    except ImportError:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as _Processor
    logger.warning(
        "%s has no preprocessor_config.json: using CLIP's standard preprocessing (bicubic resize and center "
        "crop to %d, CLIP mean/std).",
        path,
        image_size,
    )
    return _Processor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _resolve_settings(preset: dict[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    settings = dict(_DEFAULTS)
    if preset is not None:
        settings.update({k: v for k, v in preset["config"].items() if k in _CONFIG_FIELDS})
        if settings["image_embed_dim"] is None:  # the released checkpoint's embedding width (preset.json)
            settings["image_embed_dim"] = preset["preset"].get("image_embed_dim")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["mapping_type"] not in ("mlp", "transformer"):
        raise ConversionError(
            f"mapping_type must be 'mlp' or 'transformer' (or give a --preset), got {settings['mapping_type']!r}."
        )
    if settings["clip_length"] is None:
        settings["clip_length"] = settings["prefix_length"]
    if settings["freeze_language_model"] is None:
        settings["freeze_language_model"] = settings["mapping_type"] == "transformer"
    return settings


def _build_generation_config(
    preset: dict[str, Any] | None,
    text_config: Any,
    tokenizer: Any,
    stop_token_id: int,
    stop_on_eos: bool,
    num_beams: int | None,
    max_new_tokens: int | None,
) -> Any:
    from transformers import GenerationConfig

    values = dict(_GENERATION_DEFAULTS)
    if preset is not None:
        values.update(preset["generation_config"])
    if num_beams is not None:
        values["num_beams"] = num_beams
    if max_new_tokens is not None:
        values["max_new_tokens"] = max_new_tokens
    eos = text_config.eos_token_id
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
    values["eos_token_id"] = [stop_token_id, eos] if stop_on_eos and eos is not None else stop_token_id
    values["pad_token_id"] = eos if eos is not None else stop_token_id
    values["bos_token_id"] = text_config.bos_token_id if text_config.bos_token_id is not None else eos
    return GenerationConfig(**values)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------


def _load_parts(
    vision_model: str | os.PathLike | None,
    text_model: str | os.PathLike | None,
    image_embed_dim: int | None,
    settings: dict[str, Any],
    preset_data: dict[str, Any] | None,
) -> tuple[Any, Any, Any, Any, int]:
    """GPT-2 config and tokenizer, the CLIP tower and image processor (or None), and the stop token id;
    ``settings["image_embed_dim"]`` is cleared when the tower gives it."""
    text_config, tokenizer = _load_text_parts(text_model)
    tower, image_processor = (None, None)
    if vision_model is not None:
        tower, image_processor = _load_vision_parts(vision_model)
        if image_embed_dim is not None and image_embed_dim != tower.config.projection_dim:
            raise ConversionError(
                f"--image_embed_dim {image_embed_dim} contradicts --vision_model {vision_model}, whose "
                f"projection_dim is {tower.config.projection_dim}."
            )
        settings["image_embed_dim"] = None  # taken from the tower
    elif settings["image_embed_dim"] is None:
        raise ConversionError(
            "Without --vision_model the model takes image embeddings: give --image_embed_dim (512 for CLIP "
            "ViT-B/32, 640 for RN50x4) or a --preset."
        )
    stop_token_id = int((preset_data or {}).get("preset", {}).get("stop_token_id", GPT2_STOP_TOKEN_ID))
    if tokenizer is not None:
        dot = tokenizer.convert_tokens_to_ids(".")
        if dot != stop_token_id:
            raise ConversionError(
                f"The tokenizer of --text_model {text_model} maps '.' to id {dot}, but the original model stops on "
                f"GPT-2's id {stop_token_id}: use GPT-2's tokenizer."
            )
    return text_config, tokenizer, tower, image_processor, stop_token_id


def _write_output_directory(
    out: Path,
    model: ClipCapForConditionalGeneration,
    tokenizer: Any,
    image_processor: Any,
    checkpoint: Path,
    num_original_keys: int,
    preset_data: dict[str, Any] | None,
    *,
    vision_model: str | os.PathLike | None,
    text_model: str | os.PathLike | None,
    hub_model_id: str | None,
) -> None:
    """The converted model folder: weights, processor (or tokenizer / image processor), model card, provenance."""
    config = model.config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if image_processor is not None and tokenizer is not None:
        from .processing_clipcap import ClipCapProcessor

        ClipCapProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    elif tokenizer is not None:
        tokenizer.save_pretrained(out)
    elif image_processor is not None:
        image_processor.save_pretrained(out)
    sha256 = _sha256(checkpoint)
    vision_source = (
        f"CLIP vision tower from `{Path(vision_model).name}`"
        if vision_model is not None
        else f"none: takes `image_embeds` of width {config.image_embed_dim}"
    )
    text_source = f"`{Path(text_model).name}`" if text_model is not None else "GPT-2 small (default config)"
    preset = preset_data or {}
    preset_card = preset.get("conversion_card_template") or preset.get("card_template")
    card = render_conversion_card(
        model,
        config_fields=_CONFIG_FIELDS,
        source_file=checkpoint.name,
        source_sha256=sha256,
        vision_source=vision_source,
        text_source=text_source,
        repo_id=hub_model_id,
        has_tokenizer=tokenizer is not None,
        card_template=preset_card,
    )
    card.save(out / "README.md")
    provenance = {
        "source_checkpoint": checkpoint.name,
        "source_sha256": sha256,
        "preset": preset_data["name"] if preset_data else None,
        "variant": (preset_data or {}).get("preset", {}).get("variant"),
        "vision_model": str(vision_model) if vision_model is not None else None,
        "text_model": str(text_model) if text_model is not None else None,
        "num_original_keys": num_original_keys,
        "converted_on": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    (out / "conversion_info.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def _assemble_model(
    state_dict: dict[str, torch.Tensor], settings: dict[str, Any], text_config: Any, tower: Any
) -> ClipCapForConditionalGeneration:
    """The ClipCap model of ``settings`` with the checkpoint's mapper and GPT-2 weights (renamed by
    :func:`convert_state_dict`) and the vision ``tower``'s weights when one is given; eval mode."""
    try:
        config = ClipCapConfig(
            vision_config=tower.config if tower is not None else None, text_config=text_config, **settings
        )
    except (ValueError, TypeError) as err:
        raise ConversionError(f"Invalid settings for the converted model: {err}") from err
    model = ClipCapForConditionalGeneration(config)
    weights = convert_state_dict(state_dict, model)
    mapper = {k[len("mapping_network.") :]: v for k, v in weights.items() if k.startswith("mapping_network.")}
    text = {k[len("language_model.") :]: v for k, v in weights.items() if k.startswith("language_model.")}
    with torch.no_grad():
        model.mapping_network.load_state_dict(mapper, strict=True)
        model.language_model.load_state_dict(text, strict=True)
        if tower is not None:
            model.vision_model.load_state_dict(tower.state_dict(), strict=True)
    model.language_model.tie_weights()
    return model.eval()


def convert_original_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    preset: str | os.PathLike | None = None,
    mapping_type: str | None = None,
    prefix_length: int | None = None,
    clip_length: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    image_embed_dim: int | None = None,
    normalize_prefix: bool | None = None,
    freeze_language_model: bool | None = None,
    vision_model: str | os.PathLike | None = None,
    text_model: str | os.PathLike | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    stop_on_eos: bool = True,
    verify: bool = True,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> ClipCapForConditionalGeneration:
    """Convert an original ClipCap checkpoint into a :class:`ClipCapForConditionalGeneration`.

    Settings come from the defaults, then ``preset`` (``"clipcap-coco-mlp"``, ``"conceptual-mlp"``,
    ``"clipcap-coco-transformer"`` or another preset name or folder), then the explicit arguments.

    Args:
        checkpoint_path: the original ``.pt`` file (a ``torch.save``'d state dict).
        output_dir: where to write the complete model directory (``None``: nothing is written).
        mapping_type, prefix_length, clip_length, num_layers, num_heads, image_embed_dim, normalize_prefix,
            freeze_language_model: the ClipCap settings the checkpoint was trained with.
        vision_model: a local full CLIP or CLIP-vision checkpoint whose vision tower (with projection) is
            bundled. ``None``: an embeddings-only model taking ``image_embeds`` (B, image_embed_dim).
        text_model: a local GPT-2 folder whose config (and tokenizer, if present) is used; the GPT-2 weights
            always come from the checkpoint. ``None``: GPT-2 small's config and no tokenizer.
        num_beams, max_new_tokens: generation defaults (5 and 67 as in the original code).
        stop_on_eos: stop on ``<|endoftext|>`` as well as on "." (``False``: exactly the original rule).
        verify: reload the written directory and check it reproduces this model's prefix and logits.
        push_to_hub, hub_model_id, private, token: upload the directory to the Hub as ``hub_model_id``.

    Returns:
        The converted model (eval mode).

    Raises:
        ConversionError: unsafe or malformed checkpoint, missing / unexpected / mis-shaped keys, bad settings.
    """
    from tqdm.auto import tqdm

    if push_to_hub and not hub_model_id:
        raise ConversionError("--push_to_hub needs --hub_model_id ORG/NAME.")
    preset_data = _read_conversion_preset(preset) if preset is not None else None
    settings = _resolve_settings(
        preset_data,
        {
            "mapping_type": mapping_type,
            "prefix_length": prefix_length,
            "clip_length": clip_length,
            "mapping_num_layers": num_layers,
            "mapping_num_heads": num_heads,
            "image_embed_dim": image_embed_dim,
            "normalize_prefix": normalize_prefix,
            "freeze_language_model": freeze_language_model,
        },
    )
    checkpoint = Path(checkpoint_path)
    steps = tqdm(total=5 + int(verify) + int(push_to_hub), desc="convert", unit="step", disable=None)

    steps.set_postfix_str("loading checkpoint")
    state_dict = load_original_state_dict(checkpoint)
    steps.update()

    steps.set_postfix_str("loading CLIP / GPT-2 parts")
    text_config, tokenizer, tower, image_processor, stop_token_id = _load_parts(
        vision_model, text_model, image_embed_dim, settings, preset_data
    )
    steps.update()

    steps.set_postfix_str("mapping keys")
    model = _assemble_model(state_dict, settings, text_config, tower)
    model.generation_config = _build_generation_config(
        preset_data, text_config, tokenizer, stop_token_id, stop_on_eos, num_beams, max_new_tokens
    )
    steps.update()

    if output_dir is None and push_to_hub:
        output_dir = tempfile.mkdtemp(prefix="clipcap-convert-")
    if output_dir is not None:
        steps.set_postfix_str("saving")
        out = Path(output_dir)
        _write_output_directory(
            out, model, tokenizer, image_processor, checkpoint, len(state_dict), preset_data,
            vision_model=vision_model, text_model=text_model, hub_model_id=hub_model_id,
        )  # fmt: skip
        steps.update()
        if verify:
            steps.set_postfix_str("verifying")
            verify_converted_directory(out, model)
            steps.update()
        if push_to_hub:
            steps.set_postfix_str("pushing")
            push_folder(
                out,
                hub_model_id,
                token=token,
                private=private,
                commit_message="Add ClipCap model converted from the original checkpoint",
            )
            steps.update()
    else:
        steps.update()
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return model


@torch.no_grad()
def verify_converted_directory(path: str | os.PathLike, model: ClipCapForConditionalGeneration) -> None:
    """Reload ``path`` and check it gives ``model``'s prefix (B, K, E) and logits for random inputs."""
    reloaded = ClipCapForConditionalGeneration.from_pretrained(path).eval()
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, model.config.image_embed_dim, generator=generator)
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 5), generator=generator)
    a = model(image_embeds=embeds, input_ids=ids)
    b = reloaded(image_embeds=embeds, input_ids=ids)
    diff = max(
        (a.prefix_embeds - b.prefix_embeds).abs().max().item(), (a.logits - b.logits).abs().max().item()
    )
    if diff > 1e-5:
        raise ConversionError(
            f"The saved model in {path} does not reproduce the converted one (max diff {diff})."
        )
    if model.vision_model is not None:
        for name, tensor in model.vision_model.state_dict().items():
            if not torch.equal(tensor, reloaded.vision_model.state_dict()[name]):
                raise ConversionError(f"The saved vision tower in {path} differs at {name}.")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``clipcap convert``."""
    from .cli import add_bool_argument, add_renamed_argument

    parser.add_argument("--checkpoint", required=True, help="the original .pt file (coco_weights.pt, ...)")
    parser.add_argument("--output_dir", help="folder to write the converted model to")
    parser.add_argument(
        "--preset",
        help="preset of a released checkpoint: clipcap-coco-mlp, conceptual-mlp, clipcap-coco-transformer "
        "(or another hub_configs/ name or preset folder)",
    )
    parser.add_argument("--mapping_type", choices=("mlp", "transformer"))
    parser.add_argument("--prefix_length", type=int, help="K, prefix vectors (10 MLP, 40 transformer)")
    parser.add_argument(
        "--clip_length", type=int, help="transformer mapper: CLIP tokens (original --prefix_length_clip)"
    )
    parser.add_argument("--mapping_num_layers", type=int, help="transformer mapper layers (8)")
    parser.add_argument("--mapping_num_heads", type=int, help="transformer mapper heads (8)")
    parser.add_argument(
        "--image_embed_dim", type=int, help="CLIP embedding width without --vision_model (512, 640)"
    )
    add_bool_argument(
        parser,
        "normalize_prefix",
        default=None,
        help="L2-normalise image embeddings before the mapper (default: the preset's; the transformer "
        "checkpoint was trained so)",
    )
    add_bool_argument(
        parser, "freeze_language_model", default=None, help="for later training (default: the preset's)"
    )
    parser.add_argument(
        "--vision_model", help="local full CLIP or CLIP-vision checkpoint folder (ViT-B/32 variants)"
    )
    parser.add_argument(
        "--text_model", help="local GPT-2 folder: config and tokenizer (weights come from --checkpoint)"
    )
    parser.add_argument("--num_beams", type=int, help="default beams in generation_config.json (5)")
    parser.add_argument(
        "--max_new_tokens", type=int, help="default token limit in generation_config.json (67)"
    )
    add_bool_argument(
        parser,
        "stop_on_eos",
        default=True,
        help="stop on <|endoftext|> as well as on '.'; --no_stop_on_eos: only on '.', as the original",
    )
    add_bool_argument(parser, "verify", default=True, help="reload the output and compare")
    add_bool_argument(parser, "push_to_hub", help="upload the output folder to the Hub")
    parser.add_argument("--hub_model_id", help="ORG/NAME of the Hub repository")
    add_bool_argument(parser, "private", help="create the Hub repository private")
    # the earlier spellings, kept working for now
    add_renamed_argument(parser, "--num_layers", "--mapping_num_layers")
    add_renamed_argument(parser, "--num_heads", "--mapping_num_heads")
    for name in ("normalize_prefix", "freeze_language_model"):
        add_renamed_argument(parser, f"--no-{name}", f"--no_{name}")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``clipcap convert``; returns 0 on success, 2 on a refused checkpoint or bad settings."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.output_dir is None and not args.push_to_hub:
        print("clipcap convert: give --output_dir (and/or --push_to_hub --hub_model_id ORG/NAME).")
        return 2
    try:
        model = convert_original_checkpoint(
            args.checkpoint,
            args.output_dir,
            preset=args.preset,
            mapping_type=args.mapping_type,
            prefix_length=args.prefix_length,
            clip_length=args.clip_length,
            num_layers=args.mapping_num_layers,
            num_heads=args.mapping_num_heads,
            image_embed_dim=args.image_embed_dim,
            normalize_prefix=args.normalize_prefix,
            freeze_language_model=args.freeze_language_model,
            vision_model=args.vision_model,
            text_model=args.text_model,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            stop_on_eos=args.stop_on_eos,
            verify=args.verify,
            push_to_hub=args.push_to_hub,
            hub_model_id=args.hub_model_id,
            private=args.private,
        )
    except ConversionError as err:
        print(f"clipcap convert: error: {err}")
        return 2
    where = args.output_dir or ""
    if args.push_to_hub:
        where = f"{where} and the Hub repository {args.hub_model_id}".strip()
    print(
        f"Converted {args.checkpoint} ({model.config.mapping_type} mapper, prefix {model.config.prefix_length}, "
        f"{'vision tower' if model.vision_model is not None else 'image_embeds input'}) -> {where}"
    )
    return 0


__all__ = [
    "ConversionError",
    "convert_original_checkpoint",
    "convert_state_dict",
    "describe_checkpoint",
    "load_original_state_dict",
    "map_original_key",
]
