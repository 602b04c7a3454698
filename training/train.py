#!/usr/bin/env python
"""Train a ClipCap captioner with Accelerate (one CPU, one GPU, many GPUs, DeepSpeed, FSDP).

    accelerate launch training/train.py --config hub_configs/clipcap-coco-mlp \
        --train_file data/coco/dataset_coco.json --image_dir data/coco/images --output_dir runs/coco-mlp

Also runs as ``python training/train.py ...`` (one process). Follows the Accelerate ``*_no_trainer``
examples: flat argparse, one ``main()`` that reads top to bottom. docs/training.md has the recipes.

What happens, in order:

1. Arguments: ``--config`` names a preset folder (``hub_configs/<name>`` or any path) holding
   ``training_args.json`` (defaults for any flag below), optionally ``config.json`` (ClipCap model
   fields, or a full config to build the model from scratch), ``generation_config.json`` and a
   ``model_card.md`` template. Flags given on the command line win.
2. Model, tokenizer and image processor: from ``--model_name_or_path`` (continue a ClipCap
   checkpoint), or CLIP ``--vision_model_name_or_path`` + GPT-2 ``--text_model_name_or_path``, or
   the preset's full ``config.json`` (random weights).
3. Data (``modeling_clipcap.data``): Karpathy JSON, JSONL/CSV + image folder, or any ``datasets``
   dataset. With a frozen vision tower each unique image is encoded once and the embeddings are
   cached on disk (``modeling_clipcap.embedding_cache``), so training reads ``image_embeds``.
   ``--streaming`` reads a ``datasets`` dataset lazily and encodes images on the fly.
4. The loop: AdamW on the trainable parameters only, linear warm-up schedule, gradient accumulation
   with the loss normalised by the number of caption tokens of the whole optimizer step (summed over
   micro-batches and processes), so 1 process x batch 2B equals 2 processes x batch B.
5. Checkpoints (``accelerator.save_state`` + a small ``training_state.json``) are written to a
   temporary folder and renamed into place; ``--resume_from_checkpoint latest`` continues at the same
   position in the same data order with the same RNG states.
6. Validation every ``--eval_steps``: loss on the validation captions plus generated captions scored
   with ``modeling_clipcap.evaluation.compute_caption_metrics``.
7. The end: ``save_pretrained`` model + processor + generation config + model card in
   ``--output_dir``, a summary, and ``--push_to_hub``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import string
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import GradientAccumulationPlugin, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, get_scheduler

import modeling_clipcap  # noqa: F401  (registers the Auto classes)
from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapProcessor
from modeling_clipcap.data import CaptionCollator, explode_captions, load_caption_dataset
from modeling_clipcap.embedding_cache import build_embedding_cache, encoder_fingerprint
from modeling_clipcap.image_io import load_image

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_PATTERN = re.compile(r"^(step|epoch)_(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
# Arguments that are ClipCap model-config fields (they override the preset's config.json).
MODEL_FIELDS = (
    "mapping_type",
    "prefix_length",
    "clip_length",
    "normalize_prefix",
    "freeze_language_model",
    "freeze_vision",
)


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def str2bool(value: str | bool) -> bool:
    """``true/false/yes/no/1/0`` -> bool (for flags that a preset may set either way)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """All flags. Defaults of ``None`` mean "from the preset, else the built-in default" (see DEFAULTS)."""
    p = argparse.ArgumentParser(description="Train a ClipCap image captioner with Accelerate.")
    g = p.add_argument_group("preset and model")
    g.add_argument("--config", type=str, default=None, help="Preset folder (hub_configs/<name>, or a path).")
    g.add_argument("--model_name_or_path", type=str, default=None, help="Continue from a ClipCap checkpoint.")
    g.add_argument("--vision_model_name_or_path", type=str, default=None, help="CLIP (vision) checkpoint.")
    g.add_argument("--text_model_name_or_path", type=str, default=None, help="GPT-2 checkpoint.")
    g.add_argument("--tokenizer_name", type=str, default=None, help="Tokenizer (default: the text model's).")
    g.add_argument(
        "--image_processor_name", type=str, default=None, help="Image processor (default: CLIP's)."
    )
    g.add_argument("--mapping_type", type=str, default=None, choices=["mlp", "transformer"])
    g.add_argument("--prefix_length", type=int, default=None, help="K, prefix vectors given to GPT-2.")
    g.add_argument("--clip_length", type=int, default=None, help="Transformer mapper: CLIP tokens.")
    g.add_argument("--normalize_prefix", type=str2bool, nargs="?", const=True, default=None)
    g.add_argument(
        "--freeze_language_model",
        type=str2bool,
        nargs="?",
        const=True,
        default=None,
        help="Train only the mapping network (GPT-2 frozen).",
    )
    g.add_argument(
        "--freeze_vision",
        type=str2bool,
        nargs="?",
        const=True,
        default=None,
        help="Keep the CLIP tower frozen (default true; false trains it from pixels, without the embedding cache).",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--train_file", type=str, default=None, help="Karpathy JSON, metadata JSONL/CSV, or a folder."
    )
    g.add_argument("--validation_file", type=str, default=None)
    g.add_argument("--image_dir", type=str, default=None, help="Folder the file names are relative to.")
    g.add_argument("--validation_image_dir", type=str, default=None, help="Default: --image_dir.")
    g.add_argument("--dataset_name", type=str, default=None, help="A datasets dataset (name or local path).")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--train_split", type=str, default=None)
    g.add_argument("--validation_split", type=str, default=None)
    g.add_argument("--image_column", type=str, default=None)
    g.add_argument("--caption_column", type=str, default=None)
    g.add_argument("--streaming", type=str2bool, nargs="?", const=True, default=None)
    g.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training images.")
    g.add_argument("--max_eval_samples", type=int, default=None, help="Use the first N validation images.")
    g.add_argument("--max_caption_length", type=int, default=None, help="Tokens per caption, eos included.")
    g.add_argument("--on_bad_image", type=str, default=None, choices=["fail", "skip"])
    g.add_argument("--embedding_cache_dir", type=str, default=None, help="Where image embeddings are cached.")
    g.add_argument("--no_embedding_cache", type=str2bool, nargs="?", const=True, default=None)
    g.add_argument("--embedding_batch_size", type=int, default=None)
    g.add_argument("--preprocessing_num_workers", type=int, default=None)

    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", type=str, default=None)
    g.add_argument("--per_device_train_batch_size", type=int, default=None)
    g.add_argument("--per_device_eval_batch_size", type=int, default=None)
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--weight_decay", type=float, default=None)
    g.add_argument("--lr_scheduler_type", type=str, default=None)
    g.add_argument("--num_warmup_steps", type=int, default=None)
    g.add_argument("--num_train_epochs", type=int, default=None)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None)
    g.add_argument("--max_grad_norm", type=float, default=None, help="0 disables clipping.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--seed", type=int, default=None)

    g = p.add_argument_group("checkpoints, logging, validation")
    g.add_argument("--checkpointing_steps", type=str, default=None, help='N optimizer steps, or "epoch".')
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep the newest N checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder or "latest".'
    )
    g.add_argument(
        "--stop_after_steps", type=int, default=None, help="Save a checkpoint and stop after N steps."
    )
    g.add_argument("--logging_steps", type=int, default=None)
    g.add_argument("--report_to", type=str, default=None, help='"none", "all", "tensorboard", "wandb", ...')
    g.add_argument(
        "--eval_steps", type=int, default=None, help="Validate every N steps (0: at the end only)."
    )
    g.add_argument("--num_beams", type=int, default=None, help="Beams for validation captions.")
    g.add_argument("--max_new_tokens", type=int, default=None, help="Longest validation caption.")
    g.add_argument("--eval_meteor", type=str2bool, nargs="?", const=True, default=None)

    g = p.add_argument_group("publishing")
    g.add_argument("--push_to_hub", type=str2bool, nargs="?", const=True, default=None)
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", type=str2bool, nargs="?", const=True, default=None)
    return p


DEFAULTS: dict[str, Any] = {
    "train_split": "train",
    "validation_split": "validation",
    "streaming": False,
    "max_caption_length": 64,
    "on_bad_image": "fail",
    "no_embedding_cache": False,
    "embedding_batch_size": 64,
    "preprocessing_num_workers": 0,
    "output_dir": "clipcap-output",
    "per_device_train_batch_size": 40,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-5,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "num_warmup_steps": 5000,
    "num_train_epochs": 10,
    "gradient_accumulation_steps": 1,
    "max_grad_norm": 0.0,
    "seed": 42,
    "logging_steps": 10,
    "report_to": "none",
    "eval_steps": 0,
    "eval_meteor": False,
    "push_to_hub": False,
    "hub_private_repo": False,
}


def resolve_preset(name: str) -> Path:
    """A preset folder from a path or a name under the repository's ``hub_configs/``."""
    for candidate in (Path(name), REPO_ROOT / "hub_configs" / name):
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"--config {name!r}: no such preset folder (looked at {Path(name).resolve()} and "
        f"{REPO_ROOT / 'hub_configs' / name}). Pass a folder with training_args.json / config.json."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line > preset ``training_args.json`` > DEFAULTS. Adds ``args.preset`` (folder or None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.preset = None
    preset_values: dict[str, Any] = {}
    if args.config is not None:
        args.preset = resolve_preset(args.config)
        path = args.preset / "training_args.json"
        if path.is_file():
            preset_values = json.loads(path.read_text())
            known = {a.dest for a in parser._actions}
            unknown = sorted(set(preset_values) - known - {"_comment"})
            if unknown:
                raise ValueError(f"{path}: unknown training arguments {unknown}; see train.py --help.")
            for key, value in preset_values.items():
                if isinstance(value, str) and value.startswith("./"):  # relative to the preset folder
                    preset_values[key] = str(args.preset / value[2:])
    for key, value in vars(args).items():
        if value is None and key in preset_values:
            setattr(args, key, preset_values[key])
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.train_file is None and args.dataset_name is None:
        parser.error("give --train_file (caption file or folder) or --dataset_name.")
    if args.streaming and args.dataset_name is None:
        parser.error("--streaming reads a datasets dataset: give --dataset_name.")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming has no epoch length: give --max_train_steps.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/clipcap-coco).")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f'--checkpointing_steps must be a positive integer or "epoch", got {args.checkpointing_steps!r}.'
            )
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_caption_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return args


# ------------------------------------------------------------------------------------------------
# Helpers (used by main, and by the tests)
# ------------------------------------------------------------------------------------------------


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` that depends only on ``seed`` and the epoch (``set_epoch``).

    Every process computes the same order, so Accelerate's batch sharding gives process ``r`` the
    batches ``r, r + P, ...`` of that order: one process with batch 2B sees the same global batches
    as two processes with batch B, and a resumed run sees the same order as the interrupted one.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class CachedCaptionDataset(torch.utils.data.Dataset):
    """(image, caption) rows over cached embeddings: row ``i`` -> ``{"image_embeds": (D,), "caption": str}``."""

    def __init__(self, embeds: torch.Tensor, rows: list[int], captions: list[str]):
        self.embeds = embeds
        self.rows = rows
        self.captions = captions

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image_embeds": self.embeds[self.rows[i]], "caption": self.captions[i]}


class EvalImageDataset(torch.utils.data.Dataset):
    """Validation images: row ``i`` -> ``{"image_embeds": (D,), "index": i}`` from cached embeddings,
    or ``{"pixel_values": (3, H, W), "index": i}`` from the images (vision tower not frozen)."""

    def __init__(
        self, embeds: torch.Tensor | None = None, images: list[Any] | None = None, image_processor: Any = None
    ):
        self.embeds = embeds
        self.images = images
        self.image_processor = image_processor

    def __len__(self) -> int:
        return self.embeds.shape[0] if self.embeds is not None else len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.embeds is not None:
            return {"image_embeds": self.embeds[i], "index": i}
        image = load_image(self.images[i])
        return {
            "pixel_values": self.image_processor([image], return_tensors="pt")["pixel_values"][0],
            "index": i,
        }


def build_model_and_processor(
    args: argparse.Namespace,
) -> tuple[ClipCapForConditionalGeneration, ClipCapProcessor]:
    """The model (pretrained parts or the preset's config) and its processor; config flags applied."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    preset = args.preset
    preset_config: dict[str, Any] = {}
    if preset is not None and (preset / "config.json").is_file():
        preset_config = json.loads((preset / "config.json").read_text())
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS if getattr(args, k) is not None}

    if args.model_name_or_path:
        model = ClipCapForConditionalGeneration.from_pretrained(args.model_name_or_path)
        for key, value in overrides.items():
            if key in ("freeze_language_model", "freeze_vision"):
                setattr(model.config, key, value)
            elif getattr(model.config, key) != value:
                raise ValueError(
                    f"--{key}={value} differs from {args.model_name_or_path}'s {key}={getattr(model.config, key)}; "
                    "a trained model's architecture cannot change. Drop the flag."
                )
        model.language_model.requires_grad_(not model.config.freeze_language_model)
        if model.vision_model is not None:
            model.vision_model.requires_grad_(not model.config.freeze_vision)
        model._apply_freezing()
    elif args.text_model_name_or_path:
        fields = {k: v for k, v in preset_config.items() if k in ClipCapConfig.__dataclass_fields__}
        for key in (
            "vision_config",
            "text_config",
            "model_type",
            "architectures",
            "auto_map",
            "transformers_version",
        ):
            fields.pop(key, None)
        fields.update(overrides)
        model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
            args.vision_model_name_or_path, args.text_model_name_or_path, **fields
        )
    elif preset_config.get("text_config") is not None:
        config_dict = {
            k: v
            for k, v in preset_config.items()
            if k not in ("auto_map", "architectures", "transformers_version")
        }
        config_dict.pop("model_type", None)
        config_dict.update(overrides)
        model = ClipCapForConditionalGeneration(ClipCapConfig(**config_dict))
    else:
        raise ValueError(
            "No model to train: give --model_name_or_path (a ClipCap checkpoint), or --text_model_name_or_path "
            "(GPT-2) with --vision_model_name_or_path (CLIP), or a --config preset whose config.json has "
            "vision_config and text_config."
        )

    tokenizer_source = (
        args.tokenizer_name
        or args.model_name_or_path
        or args.text_model_name_or_path
        or (str(preset) if preset is not None and any(preset.glob("tokenizer*.json")) else None)
    )
    if tokenizer_source is None:
        raise ValueError("No tokenizer: give --tokenizer_name (a GPT-2 tokenizer folder or name).")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_source} has no eos token; captions must end with one.")
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_source} has {len(tokenizer)} tokens but GPT-2's vocab_size is "
            f"{model.config.text_config.vocab_size}; use the matching tokenizer."
        )

    image_processor = None
    for source in (args.image_processor_name, args.model_name_or_path, args.vision_model_name_or_path):
        if source:
            try:
                image_processor = AutoImageProcessor.from_pretrained(source)
                break
            except (OSError, ValueError):
                if source == args.image_processor_name:
                    raise
    if image_processor is None and preset is not None and (preset / "preprocessor_config.json").is_file():
        image_processor = AutoImageProcessor.from_pretrained(str(preset))
    if image_processor is None:
        size = model.config.vision_config.image_size if model.config.vision_config is not None else 224
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    processor = ClipCapProcessor(image_processor=image_processor, tokenizer=tokenizer)

    generation = GenerationConfig()
    if preset is not None and (preset / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(preset))
    elif args.model_name_or_path:
        generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if args.num_beams is not None:
        generation.num_beams = args.num_beams
    if args.max_new_tokens is not None:
        generation.max_new_tokens = args.max_new_tokens
    if generation.max_new_tokens is None:
        generation.max_new_tokens = min(args.max_caption_length, 67)
    model.generation_config = generation
    return model, processor


def optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters an optimizer updates (for reports and tests)."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with ``training_state.json``) in ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if CHECKPOINT_PATTERN.match(path.name) and (path / TRAINING_STATE_NAME).is_file():
            state = json.loads((path / TRAINING_STATE_NAME).read_text())
            found.append((state["completed_steps"], path))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, name: str, state: dict[str, Any], limit: int | None
) -> Path:
    """``accelerator.save_state`` into ``checkpoints/.tmp-<name>``, then rename to ``checkpoints/<name>``.

    The rename happens after every process has written its part, and ``training_state.json`` is the
    last file written: a crash at any moment leaves either the complete new checkpoint or only an
    ignored ``.tmp-`` folder beside the previous complete one.
    """
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / TRAINING_STATE_NAME, "w") as fh:
            json.dump(state, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # e.g. re-saving the same step after a resume
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if limit:
            for stale in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def render_model_card(
    args: argparse.Namespace, summary: dict[str, Any], model: ClipCapForConditionalGeneration
) -> str:
    """The preset's ``model_card.md`` (a ``string.Template``) filled in, or a generic card."""
    template_path = args.preset / "model_card.md" if args.preset is not None else None
    template = (
        template_path.read_text()
        if template_path is not None and template_path.is_file()
        else DEFAULT_MODEL_CARD
    )
    hyper = {
        k: summary["hyperparameters"][k]
        for k in sorted(summary["hyperparameters"])
        if summary["hyperparameters"][k] is not None
    }
    metrics = summary.get("final_metrics") or {}
    cfg = model.config
    values = {
        "model_id": args.hub_model_id or Path(args.output_dir).name,
        "training_data": summary["training_data"],
        "base_models": ", ".join(
            x
            for x in (args.vision_model_name_or_path, args.text_model_name_or_path, args.model_name_or_path)
            if x
        )
        or "trained from scratch (random initialisation)",
        "mapping_type": cfg.mapping_type,
        "prefix_length": cfg.prefix_length,
        "freeze_language_model": cfg.freeze_language_model,
        "trainable_parameters": f"{summary['trainable_parameters']:,}",
        "hyperparameters": "\n".join(f"| {k} | {v} |" for k, v in hyper.items()),
        "metrics": "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
        or "| (no validation run) | |",
        "train_steps": summary["completed_steps"],
        "final_loss": f"{summary['final_train_loss']:.4f}"
        if summary.get("final_train_loss") is not None
        else "n/a",
    }
    return string.Template(template).safe_substitute(values)


DEFAULT_MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-to-text
tags:
- clipcap
- image-captioning
---

# $model_id

A ClipCap image captioner (CLIP image embedding -> $mapping_type mapping network -> a prefix of
$prefix_length vectors -> GPT-2), trained with `training/train.py` of the `modeling_clipcap` package.

- Base models: $base_models
- Training data: $training_data
- GPT-2 frozen: $freeze_language_model; trainable parameters: $trainable_parameters
- Optimizer steps: $train_steps; final training loss: $final_loss

## Use

```python
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("$model_id", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("$model_id", trust_remote_code=True)
inputs = processor(images=[image], return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs), skip_special_tokens=True))
```

## Training hyper-parameters

| name | value |
|---|---|
$hyperparameters

## Validation metrics

| metric | value |
|---|---|
$metrics
"""


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one training; returns the summary that is also printed and written to ``train_results.json``."""
    start_time = time.time()
    args = parse_args(argv)

    # -------------------------------------------------------------- accelerator, logging, seed
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # Accumulation is driven explicitly (see the loop): a group of micro-batches per optimizer step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        raise ValueError(
            f"--gradient_accumulation_steps={args.gradient_accumulation_steps} but the launch configuration "
            f"(e.g. the DeepSpeed config) uses {accelerator.gradient_accumulation_steps}; make them equal."
        )
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # -------------------------------------------------------------- model, tokenizer, processor
    model, processor = build_model_and_processor(args)
    tokenizer = processor.tokenizer
    frozen_vision = model.vision_model is None or model.config.freeze_vision
    use_cache = frozen_vision and not args.streaming and not args.no_embedding_cache
    if not frozen_vision and not args.no_embedding_cache:
        logger.info("freeze_vision=False: images are encoded at every step (no embedding cache).")

    # -------------------------------------------------------------- data
    def read_split(source: str, split: str | None, image_dir: str | None, limit: int | None):
        dataset, report = load_caption_dataset(
            source,
            split,
            image_dir=image_dir,
            config_name=args.dataset_config_name,
            image_column=args.image_column,
            caption_column=args.caption_column,
            on_bad_image=args.on_bad_image,
        )
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        return dataset, report

    train_source = args.train_file or args.dataset_name
    validation_source, validation_split = None, args.validation_split
    if args.validation_file:
        validation_source = args.validation_file
    elif args.dataset_name:
        validation_source = args.dataset_name
    elif args.train_file and Path(args.train_file).suffix.lower() == ".json":
        validation_source = args.train_file  # a Karpathy JSON holds the val split too
    elif (
        args.train_file
        and Path(args.train_file).is_dir()
        and (Path(args.train_file) / validation_split).is_dir()
    ):
        validation_source = args.train_file  # <folder>/<split>/metadata.jsonl

    skipped_images: list[tuple[str, str]] = []
    reports: list[dict[str, Any]] = []
    train_stream = None
    with accelerator.main_process_first():
        if args.streaming:
            train_stream = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, split=args.train_split, streaming=True
            )
            train_images = None
        else:
            train_images, train_report = read_split(
                train_source, args.train_split, args.image_dir, args.max_train_samples
            )
            reports.append(train_report.to_dict())
            skipped_images += [tuple(s) for s in train_report.skipped_images]
            if accelerator.is_main_process:
                logger.info(train_report.summary())
        val_images = None
        if validation_source is not None:
            try:
                val_images, val_report = read_split(
                    validation_source,
                    validation_split,
                    args.validation_image_dir or args.image_dir,
                    args.max_eval_samples,
                )
                reports.append(val_report.to_dict())
                skipped_images += [tuple(s) for s in val_report.skipped_images]
                if accelerator.is_main_process:
                    logger.info(val_report.summary())
            except (ValueError, KeyError) as err:
                if args.validation_file:
                    raise
                logger.warning(f"no validation split found ({err}); validation is off.")
                val_images = None

    def embed_images(images_ds: datasets.Dataset, desc: str) -> tuple[torch.Tensor, datasets.Dataset]:
        """Embeddings of a split's images (encoded once, cached) and the rows that have one."""
        cache_dir = args.embedding_cache_dir or str(
            Path(datasets.config.HF_DATASETS_CACHE) / "clipcap_embeddings"
        )
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        with accelerator.main_process_first():  # the main process encodes; the others read its cache
            cache = build_embedding_cache(
                model,
                processor.image_processor,
                images_ds["image"],
                keys=images_ds["image_id"],
                cache_dir=cache_dir,
                batch_size=args.embedding_batch_size,
                dtype=dtype,
                device=accelerator.device,
                num_workers=args.preprocessing_num_workers,
                on_bad_image=args.on_bad_image,
                show_progress=accelerator.is_local_main_process,
                desc=desc,
                encoder_hash=encoder_hash,
            )
        if accelerator.is_main_process:
            logger.info(
                f"{desc}: {cache.num_encoded} images encoded, {cache.num_reused} read from the cache {cache.path}"
            )
        encode_stats[desc] = {
            "encoded": cache.num_encoded,
            "reused": cache.num_reused,
            "path": str(cache.path),
        }
        skipped_images.extend(cache.skipped)
        index = cache.index
        keep = [i for i, key in enumerate(images_ds["image_id"]) if key in index]
        if len(keep) != len(images_ds):
            images_ds = images_ds.select(keep)
        embeds = cache.embeddings()
        order = torch.tensor([index[key] for key in images_ds["image_id"]], dtype=torch.long)
        return embeds[order], images_ds

    encode_stats: dict[str, Any] = {}
    encoder_hash = None
    if use_cache or (val_images is not None and frozen_vision and model.vision_model is not None):
        model.to(accelerator.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            accelerator.mixed_precision
        ) or torch.float32
        encoder_hash = (
            encoder_fingerprint(model, processor.image_processor, dtype)
            if model.vision_model is not None
            else None
        )

    collator = CaptionCollator(tokenizer, args.max_caption_length, image_processor=processor.image_processor)
    if use_cache:
        if model.vision_model is None:
            raise ValueError(
                "This model has no vision tower (embeddings only): train it on precomputed image_embeds "
                "through the Python API; train.py reads images."
            )
        train_embeds, train_images = embed_images(train_images, "Encoding train images")
        flat = explode_captions(train_images.add_column("embed_row", list(range(len(train_images)))))
        train_dataset = CachedCaptionDataset(train_embeds, flat["embed_row"], flat["caption"])
        training_data = f"{train_source} ({len(train_images)} images, {len(train_dataset)} captions)"
    elif train_stream is not None:
        image_col = args.image_column or "image"
        caption_col = args.caption_column or "caption"
        if image_col in (train_stream.features or {}) and isinstance(
            train_stream.features[image_col], datasets.Image
        ):
            train_stream = train_stream.cast_column(image_col, datasets.Image(decode=False))

        def explode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            out = {"image": [], "caption": []}
            for image, caps in zip(batch[image_col], batch[caption_col]):
                for cap in caps if isinstance(caps, list) else [caps]:
                    if isinstance(cap, str) and cap.strip():
                        out["image"].append(image)
                        out["caption"].append(cap.strip())
            return out

        train_dataset = train_stream.map(
            explode, batched=True, remove_columns=list(train_stream.column_names or [])
        )
        training_data = f"{args.dataset_name} (streaming)"
    else:
        flat = explode_captions(train_images)
        train_dataset = flat.select_columns(["image", "caption"])
        training_data = f"{train_source} ({len(train_images)} images, {len(train_dataset)} captions)"
    if not args.streaming and len(train_dataset) == 0:
        raise ValueError(f"{train_source}: no training captions left (see the data report above).")

    val_embeds, val_references = None, None
    if val_images is not None and len(val_images) > 0:
        if model.vision_model is not None and frozen_vision:
            val_embeds, val_images = embed_images(val_images, "Encoding validation images")
        else:
            val_embeds = None  # validation encodes on the fly
        val_references = val_images["captions"]

    if args.streaming:
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset, batch_size=args.per_device_train_batch_size, collate_fn=collator
        )
        sampler = None
    else:
        sampler = EpochShuffleSampler(len(train_dataset), args.seed)
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=collator,
            num_workers=0 if use_cache else args.preprocessing_num_workers,
            generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG untouched by iterators
        )

    # -------------------------------------------------------------- optimizer, scheduler
    optimizer = torch.optim.AdamW(model.optimizer_parameter_groups(args.weight_decay), lr=args.learning_rate)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())

    accum = args.gradient_accumulation_steps
    if args.streaming:
        steps_per_epoch = None
        max_train_steps = args.max_train_steps
        num_epochs = 1
    else:
        batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_process / accum)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # Accelerate steps a prepared scheduler once per process per optimizer step (the *_no_trainer convention).
    lr_scheduler = get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    eval_dataloader, val_loss_dataloader = None, None
    if val_references is not None:
        # Own generators: iterating these loaders must not move the global RNG (exact resume).
        eval_kwargs = {
            "batch_size": args.per_device_eval_batch_size,
            "shuffle": False,
            "generator": torch.Generator(),
        }
        if val_embeds is not None:
            eval_images = EvalImageDataset(embeds=val_embeds)
            flat_val = explode_captions(val_images.add_column("embed_row", list(range(len(val_images)))))
            val_captions = CachedCaptionDataset(val_embeds, flat_val["embed_row"], flat_val["caption"])
        else:
            eval_images = EvalImageDataset(
                images=val_images["image"], image_processor=processor.image_processor
            )
            val_captions = explode_captions(val_images).select_columns(["image", "caption"])
        eval_dataloader = accelerator.prepare(torch.utils.data.DataLoader(eval_images, **eval_kwargs))
        val_loss_dataloader = accelerator.prepare(
            torch.utils.data.DataLoader(val_captions, collate_fn=collator, **eval_kwargs)
        )

    if args.report_to != "none":
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("clipcap", tracker_config)

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * accum
    logger.info("***** Running training *****")
    if not args.streaming:
        logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num epochs = {num_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
    logger.info(f"  Total train batch size (parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {accum}")
    logger.info(f"  Total optimization steps = {max_train_steps}")
    logger.info(f"  Trainable parameters = {trainable:,} of {total:,}")

    # -------------------------------------------------------------- resume
    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            found = list_checkpoints(args.output_dir)
            checkpoint = found[-1] if found else None
            if checkpoint is None:
                logger.warning(
                    f"--resume_from_checkpoint latest: no checkpoint in {output_dir / 'checkpoints'}; starting fresh."
                )
        else:
            checkpoint = Path(args.resume_from_checkpoint)
            if not (checkpoint / TRAINING_STATE_NAME).is_file():
                raise FileNotFoundError(
                    f"{checkpoint} is not a complete checkpoint (no {TRAINING_STATE_NAME}); "
                    f"complete ones: {[str(p) for p in list_checkpoints(args.output_dir)]}"
                )
        if checkpoint is not None:
            state = json.loads((checkpoint / TRAINING_STATE_NAME).read_text())
            if (
                state["total_batch_size"] != total_batch_size
                or state["num_processes"] != accelerator.num_processes
            ):
                raise ValueError(
                    f"{checkpoint} was written by {state['num_processes']} process(es) with a total batch of "
                    f"{state['total_batch_size']}; this run has {accelerator.num_processes} and {total_batch_size}. "
                    "Resume with the same launch configuration to continue exactly."
                )
            accelerator.print(f"Resumed from checkpoint: {checkpoint}")
            accelerator.load_state(str(checkpoint))
            completed_steps = state["completed_steps"]
            starting_epoch = state["epoch"]
            resume_batches = state["batches_in_epoch"]
            if steps_per_epoch is not None and resume_batches >= len(train_dataloader):
                starting_epoch, resume_batches = starting_epoch + 1, 0

    # -------------------------------------------------------------- validation
    def evaluate() -> dict[str, Any]:
        """Validation with the RNG states put back afterwards, so runs with and without it (or resumed
        around it) draw the same dropout masks."""
        states = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            metrics = run_validation()
        random.setstate(states[0])
        np.random.set_state(states[1])
        return metrics

    def run_validation() -> dict[str, Any]:
        """Validation loss over all captions and caption metrics of generated captions."""
        metrics: dict[str, Any] = {}
        unwrapped = accelerator.unwrap_model(model)
        model.eval()
        with torch.no_grad():
            if val_loss_dataloader is not None:
                loss_sum = torch.zeros((), device=accelerator.device)
                tokens = torch.zeros((), device=accelerator.device)
                for batch in val_loss_dataloader:
                    n = (batch["labels"] != -100).sum()
                    out = model(**batch, num_items_in_batch=n.clamp_min(1), logits_to_keep=1)
                    loss_sum += out.loss.float() * n
                    tokens += n
                loss_sum, tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(tokens, "sum")
                metrics["eval_loss"] = (loss_sum / tokens.clamp_min(1)).item()
            if eval_dataloader is not None:
                pad = unwrapped.generation_config.pad_token_id
                all_ids, all_index = [], []
                for batch in tqdm(
                    eval_dataloader,
                    desc="Validation captions",
                    disable=not accelerator.is_local_main_process,
                    leave=False,
                ):
                    ids = unwrapped.generate(
                        image_embeds=batch.get("image_embeds"),
                        pixel_values=batch.get("pixel_values"),
                        generation_config=unwrapped.generation_config,
                    )
                    ids = accelerator.pad_across_processes(ids, dim=1, pad_index=pad)
                    ids, index = accelerator.gather_for_metrics((ids, batch["index"]))
                    all_ids.extend(ids.cpu().tolist())
                    all_index.extend(index.cpu().tolist())
                if accelerator.is_main_process:
                    captions = processor.batch_decode(all_ids, skip_special_tokens=True)
                    predictions = {i: c for i, c in zip(all_index, captions)}
                    references = {i: list(val_references[i]) for i in predictions}
                    try:
                        from modeling_clipcap.evaluation import compute_caption_metrics

                        scores = compute_caption_metrics(
                            predictions, references, spice=False, meteor=bool(args.eval_meteor)
                        )
                        metrics.update({f"eval_{k}": v for k, v in scores.items() if isinstance(v, float)})
                    except ImportError as err:  # pycocoevalcap missing: keep training, say why
                        logger.warning(f"caption metrics unavailable ({err}); logging the loss only.")
                    exact = sum(
                        predictions[i].strip().lower() in {r.strip().lower() for r in references[i]}
                        for i in predictions
                    )
                    metrics["eval_exact_match"] = exact / max(len(predictions), 1)
                    metrics["eval_samples"] = [
                        {"prediction": predictions[i], "references": references[i][:2]}
                        for i in sorted(predictions)[:3]
                    ]
        model.train()
        return metrics

    # -------------------------------------------------------------- the loop
    log_path = output_dir / "train_log.jsonl"

    def log(record: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if args.report_to != "none":
            accelerator.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step")
            )

    def training_state(epoch: int, batches_in_epoch: int) -> dict[str, Any]:
        return {
            "completed_steps": completed_steps,
            "epoch": epoch,
            "batches_in_epoch": batches_in_epoch,
            "num_processes": accelerator.num_processes,
            "total_batch_size": total_batch_size,
            "seed": args.seed,
            "max_train_steps": max_train_steps,
        }

    def checkpoint_now(name: str, epoch: int, batches_in_epoch: int) -> None:
        save_checkpoint(
            accelerator,
            args.output_dir,
            name,
            training_state(epoch, batches_in_epoch),
            args.checkpoints_total_limit,
        )

    checkpoint_every = (
        int(args.checkpointing_steps) if str(args.checkpointing_steps or "").isdigit() else None
    )
    progress_bar = tqdm(
        range(max_train_steps),
        disable=not accelerator.is_local_main_process,
        desc="Training",
        initial=completed_steps,
    )
    # Data preparation may have used the global RNG (how much depends on what was cached): start the
    # loop from a known state. A resumed run gets its saved states back from load_state above.
    if completed_steps == 0:
        set_seed(args.seed)
    model.train()
    last_loss, last_metrics, stopped_early = None, {}, False
    losses_window: list[float] = []
    epoch = starting_epoch
    for epoch in range(starting_epoch, num_epochs):
        if completed_steps >= max_train_steps:
            break
        train_dataloader.set_epoch(epoch)
        batches_in_epoch = 0
        active = train_dataloader
        if epoch == starting_epoch and resume_batches:
            active = accelerator.skip_first_batches(train_dataloader, resume_batches)
            batches_in_epoch = resume_batches
        iterator = iter(active)
        while completed_steps < max_train_steps:
            group = []  # the micro-batches of one optimizer step
            for _ in range(accum):
                batch = next(iterator, None)
                if batch is None:
                    break
                group.append(batch)
            if not group:
                break
            batches_in_epoch += len(group)
            # Caption tokens of the whole optimizer step, over all micro-batches and processes.
            local_tokens = sum((b["labels"] != -100).sum() for b in group)
            num_items = accelerator.reduce(local_tokens.to(accelerator.device), "sum").clamp_min(1)
            step_loss = torch.zeros((), device=accelerator.device)
            # Accelerate's documented accumulation for autoregressive models: DDP syncs gradients only on
            # the last micro-batch of the group (`no_sync` before it), then one optimizer step. A group may
            # be short at the end of an epoch; the token count above keeps its mean exact anyway.
            for index, batch in enumerate(group):
                last = index == len(group) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    outputs = model(**batch, num_items_in_batch=num_items, logits_to_keep=1)
                    # loss = local token-loss sum / global tokens; Accelerate divides by `accum` and DDP
                    # averages over processes: undo both so the update uses the exact global mean.
                    accelerator.backward(outputs.loss * accum * accelerator.num_processes)
                step_loss += outputs.loss.detach().float()
            if args.max_grad_norm and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            completed_steps += 1
            progress_bar.update(1)
            last_loss = accelerator.reduce(step_loss, "sum").item()
            losses_window.append(last_loss)
            record = {
                "step": completed_steps,
                "epoch": epoch,
                "loss": last_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "tokens": int(num_items.item()),
            }
            log(record)
            if completed_steps % args.logging_steps == 0 or completed_steps == 1:
                progress_bar.set_postfix(loss=f"{sum(losses_window) / len(losses_window):.4f}")
                losses_window = []

            if checkpoint_every and completed_steps % checkpoint_every == 0:
                checkpoint_now(f"step_{completed_steps}", epoch, batches_in_epoch)
            if (
                args.eval_steps
                and completed_steps % args.eval_steps == 0
                and (eval_dataloader or val_loss_dataloader)
            ):
                last_metrics = evaluate()
                log(
                    {
                        "step": completed_steps,
                        **{k: v for k, v in last_metrics.items() if k != "eval_samples"},
                    }
                )
                if accelerator.is_main_process:
                    shown = {k: round(v, 4) for k, v in last_metrics.items() if isinstance(v, float)}
                    accelerator.print(f"step {completed_steps}: {shown}")
            if (
                args.stop_after_steps
                and completed_steps >= args.stop_after_steps
                and completed_steps < max_train_steps
            ):
                if not (checkpoint_every and completed_steps % checkpoint_every == 0):
                    checkpoint_now(f"step_{completed_steps}", epoch, batches_in_epoch)
                stopped_early = True
                break
        if stopped_early:
            break
        if args.checkpointing_steps == "epoch":
            checkpoint_now(f"epoch_{epoch}", epoch, batches_in_epoch)
    progress_bar.close()

    # -------------------------------------------------------------- final validation, save, push
    if not stopped_early and (eval_dataloader is not None or val_loss_dataloader is not None):
        last_metrics = evaluate()
        log(
            {
                "step": completed_steps,
                "final": True,
                **{k: v for k, v in last_metrics.items() if k != "eval_samples"},
            }
        )

    summary = {
        "completed_steps": completed_steps,
        "max_train_steps": max_train_steps,
        "stopped_early": stopped_early,
        "epochs": epoch + 1,
        "final_train_loss": last_loss,
        "first_train_loss": None,
        "final_metrics": {k: v for k, v in last_metrics.items() if isinstance(v, float)},
        "samples": last_metrics.get("eval_samples", []),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "optimized_modules": sorted(
            {
                name.split(".")[0]
                for name in optimizer_parameter_names(accelerator.unwrap_model(model), optimizer)
            }
        ),
        "num_processes": accelerator.num_processes,
        "total_batch_size": total_batch_size,
        "mixed_precision": accelerator.mixed_precision,
        "embedding_cache": encode_stats,
        "training_data": training_data,
        "data_reports": reports,
        "skipped_images": len(skipped_images),
        "train_seconds": round(time.time() - start_time, 1),
        "hyperparameters": {
            k: getattr(args, k)
            for k in (
                "learning_rate",
                "weight_decay",
                "lr_scheduler_type",
                "num_warmup_steps",
                "num_train_epochs",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "max_grad_norm",
                "max_caption_length",
                "seed",
                "mapping_type",
                "prefix_length",
                "clip_length",
                "freeze_language_model",
                "freeze_vision",
            )
        }
        | {
            "total_batch_size": total_batch_size,
            "max_train_steps": max_train_steps,
            "mixed_precision": accelerator.mixed_precision,
        },
    }
    if accelerator.is_main_process and log_path.is_file():
        first = next(
            (json.loads(line) for line in log_path.read_text().splitlines() if '"loss"' in line), None
        )
        summary["first_train_loss"] = first["loss"] if first else None

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if not stopped_early:
        unwrapped.save_pretrained(
            args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
    if accelerator.is_main_process:
        if skipped_images:
            (output_dir / "skipped_images.json").write_text(
                json.dumps(
                    {"count": len(skipped_images), "images": [list(s) for s in skipped_images]}, indent=2
                )
            )
        if not stopped_early:
            processor.save_pretrained(args.output_dir)
            unwrapped.generation_config.save_pretrained(args.output_dir)
            (output_dir / "README.md").write_text(render_model_card(args, summary, unwrapped))
        (output_dir / "train_results.json").write_text(json.dumps(summary, indent=2, default=str))
    accelerator.wait_for_everyone()

    if args.push_to_hub and not stopped_early and accelerator.is_main_process:
        from huggingface_hub import HfApi

        api = HfApi(token=args.hub_token)
        repo_id = api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message=f"ClipCap training: {completed_steps} steps",
            ignore_patterns=["checkpoints/**", "checkpoints/*", "*.tmp*", "runs/**"],
        )
        summary["hub_repo_id"] = repo_id
        accelerator.print(f"Pushed to the Hub: {repo_id}")
    accelerator.end_training()

    if accelerator.is_main_process:
        lines = [
            "***** Training summary *****",
            f"  steps: {completed_steps}/{max_train_steps}{' (stopped early, checkpoint saved)' if stopped_early else ''}",
            f"  training loss: first {summary['first_train_loss']}, last {last_loss}",
            f"  trainable parameters: {trainable:,} of {total:,}",
            f"  processes: {accelerator.num_processes}, total batch: {total_batch_size}, precision: {accelerator.mixed_precision}",
        ]
        for desc, stats in encode_stats.items():
            lines.append(f"  {desc}: {stats['encoded']} encoded, {stats['reused']} from cache")
        for key, value in summary["final_metrics"].items():
            lines.append(f"  {key}: {value:.4f}")
        if skipped_images:
            lines.append(
                f"  bad images skipped: {len(skipped_images)} (listed in {output_dir / 'skipped_images.json'})"
            )
        lines.append(f"  output: {output_dir.resolve()}  ({summary['train_seconds']} s)")
        accelerator.print("\n".join(lines))
    return summary


def cli() -> int:
    """Run ``main()``; bad input (data files, images, arguments) prints one ``error:`` line, exit status 2."""
    from modeling_clipcap.data import CaptionDataError

    try:
        main()
    except (CaptionDataError, ValueError, FileNotFoundError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
