#!/usr/bin/env python
"""Train a ClipCap captioner with Accelerate (one CPU, one GPU, many GPUs, DeepSpeed, FSDP).

    accelerate launch training/train.py --config hub_configs/clipcap-coco-mlp \
        --train_file data/coco/dataset_coco.json --image_dir data/coco/images --output_dir runs/coco-mlp

Also runs as ``python training/train.py ...``. Written like the Accelerate ``*_no_trainer`` examples: flat
argparse, then ``main()`` reads top to bottom. Parse (a ``--config`` preset gives the defaults, flags win);
build the model and processor (``modeling_clipcap.hub``); data (``modeling_clipcap.training_data``: with a
frozen tower each unique image is encoded once and cached); the loop (loss averaged over the caption tokens
of a whole optimizer step, atomic checkpoints and exact resume from ``modeling_clipcap.checkpointing``,
validation by ``training_data.validate``); save and push. docs/training.md has the recipes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import filter_trackers
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from tqdm.auto import tqdm
from transformers import GenerationConfig, get_scheduler

import modeling_clipcap  # noqa: F401  (registers the Auto classes)
from modeling_clipcap import ClipCapForConditionalGeneration
from modeling_clipcap.adapters import (
    ADAPTER_ARGUMENTS,
    ADAPTER_DIR,
    add_adapters,
    build_adapter_config,
    enable_activation_checkpointing,
    is_public_hub_model,
    merge_adapters,
    save_adapter,
)
from modeling_clipcap.checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
from modeling_clipcap.cli import add_bool_argument
from modeling_clipcap.hub import (
    load_training_model,
    load_training_processor,
    push_folder,
    render_training_card,
)
from modeling_clipcap.image_io import BAD_IMAGE_POLICIES
from modeling_clipcap.presets import find_preset, read_preset
from modeling_clipcap.shards import build_train_stream, is_shard_source
from modeling_clipcap.training_data import (
    build_datasets,
    epoch_batches,
    make_dataloaders,
    run_report,
    validate,
)
from modeling_clipcap.training_utils import optimizer_parameter_groups

logger = get_logger(__name__)

__all__ = ["build_model_and_processor", "build_parser", "main", "parse_args"]

# Arguments that are ClipCap model-config fields (they override the preset's config.json).
MODEL_FIELDS = (
    "mapping_type", "prefix_length", "clip_length", "normalize_prefix", "freeze_language_model", "freeze_vision",
    "mapping_input", "retrieval_k", "retrieval_template",
)  # fmt: skip
# Flags that say what data is read and how (keyword arguments of training_data.build_datasets / read_splits).
DATA_ARGUMENTS = (
    "train_file", "dataset_name", "dataset_config_name", "train_split", "validation_file", "validation_split",
    "image_dir", "validation_image_dir", "image_column", "caption_column", "streaming", "max_train_samples",
    "max_eval_samples", "on_bad_image", "max_caption_length", "embedding_cache", "embedding_cache_dir",
    "embedding_batch_size", "preprocessing_num_workers",
)  # fmt: skip
# Flags of a streamed shard run (keyword arguments of shards.build_train_stream).
STREAM_ARGUMENTS = (
    "train_file", "per_device_train_batch_size", "on_bad_image", "dataloader_num_workers", "seed",
    "shuffle_shards", "output_dir", "save_sample_order",
)  # fmt: skip
# Recorded in train_results.json and the model card.
HYPERPARAMETERS = MODEL_FIELDS[:3] + MODEL_FIELDS[4:] + (
    "learning_rate", "weight_decay", "lr_scheduler_type", "num_warmup_steps", "num_train_epochs", "seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "max_caption_length",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """All flags. A ``--config`` preset's ``training_args.json`` replaces the defaults; flags given win."""
    p = argparse.ArgumentParser(description="Train a ClipCap image captioner with Accelerate.")
    g = p.add_argument_group("preset and model (model fields default to the preset's config.json)")
    g.add_argument("--config", help="Preset folder (hub_configs/<name>, or a path).")
    g.add_argument("--model_name_or_path", help="Continue from a ClipCap checkpoint.")
    g.add_argument("--vision_model_name_or_path", help="Image tower checkpoint (CLIP, SigLIP, ...).")
    g.add_argument("--text_model_name_or_path", help="Causal LM checkpoint (GPT-2, ...).")
    g.add_argument("--tokenizer_name", help="Tokenizer (default: the text model's).")
    g.add_argument("--image_processor_name", help="Image processor (default: the vision model's).")
    g.add_argument("--mapping_type", choices=["mlp", "transformer"])
    g.add_argument("--mapping_input", choices=["pooled", "tokens"], help="tokens: the token features.")
    g.add_argument("--prefix_length", type=int, help="K, prefix vectors given to the language model.")
    g.add_argument("--clip_length", type=int, help="Transformer mapper: projected image tokens.")
    add_bool_argument(
        g, "normalize_prefix", default=None, help="L2-normalise image embeddings (default: preset's)."
    )
    add_bool_argument(
        g, "freeze_language_model", default=None, help="Train only the mapper (default: preset's)."
    )
    add_bool_argument(
        g, "freeze_vision", default=None, help="false: train the tower from pixels (default: preset's)."
    )

    g = p.add_argument_group("adapters (PEFT) and memory (docs/training.md)")
    g.add_argument(
        "--lora_r", type=int, help="Train LoRA adapters of rank R in the language model (needs peft)."
    )
    g.add_argument("--lora_alpha", type=float, help="LoRA scale numerator (default: 2 * lora_r).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA adapters' input.")
    g.add_argument(
        "--lora_target_modules",
        nargs="+",
        help="Language-model layer names (default: peft's for the family).",
    )
    g.add_argument("--peft_config", help="A peft adapter config JSON (IA3, LoHa, ...) instead of --lora_r.")
    add_bool_argument(g, "gradient_checkpointing", help="Recompute activations in backward (less memory).")

    g = p.add_argument_group("learning from text (retrieval augmentation, text-only training)")
    g.add_argument("--datastore", help="Retrieval datastore (clipcap index); needs --retrieval_k > 0.")
    g.add_argument("--retrieval_k", type=int, help="Captions retrieved per image into the prompt (0: off).")
    g.add_argument(
        "--retrieval_template", help="The prompt; {captions} is replaced by the retrieved captions."
    )
    add_bool_argument(g, "text_only", help="Train from captions alone: text embeddings + noise, no image.")
    g.add_argument(
        "--text_file",
        help="Captions without images (a caption file or a .txt, one a line) learnt alongside the pairs of "
        "--train_file, through their text embeddings + noise as in --text_only.",
    )
    g.add_argument(
        "--text_repeat",
        type=int,
        default=1,
        help="--text_file: times each text row is seen per epoch (default 1).",
    )
    g.add_argument(
        "--towers", help="--text_only/--text_file: the towers (default: --vision_model_name_or_path)."
    )
    g.add_argument("--noise_std", type=float, help="Text rows' noise (default: estimated, else 0.126).")
    g.add_argument(
        "--noise_sample_file", help="Paired captions to estimate --noise_std (and the shift) from."
    )
    g.add_argument("--noise_sample_size", type=int, default=256, help="Images of --noise_sample_file read.")
    add_bool_argument(
        g,
        "modality_shift",
        help="Move text rows by the mean image-minus-caption gap of --noise_sample_file (noise: what is left).",
    )

    g = p.add_argument_group("data")
    g.add_argument("--train_file", help="Karpathy JSON, metadata JSONL/CSV, or a folder.")
    g.add_argument("--validation_file")
    g.add_argument("--image_dir", help="Folder the file names are relative to.")
    g.add_argument("--validation_image_dir", help="Default: --image_dir.")
    g.add_argument("--dataset_name", help="A datasets dataset (name or local path).")
    g.add_argument("--dataset_config_name")
    g.add_argument("--train_split", default="train")
    g.add_argument("--validation_split", default="validation")
    g.add_argument("--image_column")
    g.add_argument("--caption_column")
    add_bool_argument(g, "streaming", help="Read the data as it is trained on (needs --max_train_steps).")
    g.add_argument("--max_train_samples", type=int, help="Use the first N training images.")
    g.add_argument("--max_eval_samples", type=int, help="Use the first N validation images.")
    g.add_argument("--max_caption_length", type=int, default=64, help="Tokens per caption, eos included.")
    g.add_argument("--on_bad_image", choices=BAD_IMAGE_POLICIES, default="fail", help="error = fail.")
    g.add_argument("--embedding_cache_dir", help="Where image embeddings are cached.")
    add_bool_argument(g, "embedding_cache", default=True, help="Encode each image once.")
    g.add_argument("--embedding_batch_size", type=int, default=64)
    g.add_argument("--preprocessing_num_workers", type=int, default=0)
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Workers per process (shards).")
    add_bool_argument(g, "save_sample_order", help="Keys read, per rank: output_dir/sample_order/ (shards).")
    add_bool_argument(g, "shuffle_shards", help="Streamed shards: another shard order each epoch (--seed).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="clipcap-output")
    g.add_argument("--per_device_train_batch_size", type=int, default=40)
    g.add_argument("--per_device_eval_batch_size", type=int, default=64)
    g.add_argument("--learning_rate", type=float, default=2e-5)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--lr_scheduler_type", default="linear")
    g.add_argument("--num_warmup_steps", type=int, default=5000)
    g.add_argument("--num_train_epochs", type=int, default=10)
    g.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=0.0, help="0 disables clipping.")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("checkpoints, logging, validation")
    g.add_argument("--checkpointing_steps", help='N optimizer steps, or "epoch".')
    g.add_argument("--checkpoints_total_limit", type=int, help="Keep the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", help='A checkpoint folder or "latest".')
    add_bool_argument(g, "allow_rng_state_loss", help="Resume without the RNG state (warns; not bit-exact).")
    g.add_argument("--stop_after_steps", type=int, help="Save a checkpoint and stop after N steps.")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--report_to", default="none", help='"none", "all", "tensorboard", "wandb", ...')
    g.add_argument("--eval_steps", type=int, default=0, help="Validate every N steps (0: at the end only).")
    g.add_argument("--num_beams", type=int, help="Beams for validation captions.")
    g.add_argument("--max_new_tokens", type=int, help="Longest validation caption.")
    add_bool_argument(g, "eval_meteor", help="Validation scores METEOR too (starts java).")

    g = p.add_argument_group("publishing")
    add_bool_argument(g, "push_to_hub", help="Upload the model to --hub_model_id.")
    g.add_argument("--hub_model_id")
    g.add_argument("--hub_token")
    add_bool_argument(g, "hub_private_repo", help="Create the Hub repository private.")
    add_bool_argument(
        g, "push_merged_model", help="With adapters: push the merged model, not the adapter alone."
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line > the preset's ``training_args.json`` > built-in defaults. Adds ``args.preset`` (a folder or
    None); paths in the preset that start with ``./`` are relative to its folder."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].config
    if preset is not None:
        try:
            preset = find_preset(preset)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--config {err}") from None
        values = read_preset(preset)["training_args"]
        values.pop("_comment", None)
        unknown = sorted(set(values) - set(vars(parser.parse_args([]))))
        if unknown:
            raise ValueError(
                f"{preset / 'training_args.json'}: unknown training arguments {unknown}; see train.py --help."
            )
        relative = {
            k: str(preset / v[2:]) for k, v in values.items() if isinstance(v, str) and v.startswith("./")
        }
        parser.set_defaults(**(values | relative))
    args = parser.parse_args(argv)
    args.preset = preset

    if args.train_file is None and args.dataset_name is None:
        parser.error("give --train_file (caption file or folder) or --dataset_name.")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming has no epoch length: give --max_train_steps.")
    if args.shuffle_shards and not (args.streaming and is_shard_source(args.train_file)):
        parser.error(  # in memory, every sample is already shuffled each epoch
            "--shuffle_shards orders the shards of --streaming --train_file <shards>; without them it does nothing."
        )
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/clipcap-coco).")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f'--checkpointing_steps must be a positive integer or "epoch", got {args.checkpointing_steps!r}.'
            )
    if args.datastore and not args.retrieval_k and not _preset_retrieval_k(preset):
        parser.error(
            "--datastore needs --retrieval_k N (captions retrieved per image), e.g. --retrieval_k 4."
        )
    if args.text_only and args.text_file:
        parser.error(
            "--text_file adds text to paired training; --text_only trains on --train_file's text alone."
        )
    if args.text_repeat < 1:
        parser.error(f"--text_repeat must be >= 1, got {args.text_repeat}.")
    if args.modality_shift and not args.noise_sample_file:
        parser.error("--modality_shift is measured on paired captions: give --noise_sample_file too.")
    if (args.text_only or args.text_file) and not (args.towers or args.vision_model_name_or_path):
        parser.error(
            "--text_only/--text_file need --towers (or --vision_model_name_or_path): the towers with a text side."
        )
    if args.text_only and args.streaming:
        parser.error("--text_only reads its captions in memory; drop --streaming.")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_caption_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return args


def _preset_retrieval_k(preset: Path | None) -> int:
    return int(read_preset(preset)["config"].get("retrieval_k") or 0) if preset is not None else 0


def build_model_and_processor(
    args: argparse.Namespace, towers: Any = None
) -> tuple[ClipCapForConditionalGeneration, Any]:
    """The model (pretrained parts or the preset's config) with its processor and generation config.

    ``towers`` (text-only training, ``retrieval.Towers``): the model reads the joint space, so it gets the towers'
    image projection (``joint_embed_dim``, weights copied, frozen with the tower) and ``normalize_prefix``."""
    preset = args.preset
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS if getattr(args, k) is not None}
    if towers is not None and towers.image_projection is not None and not args.model_name_or_path:
        overrides |= {"joint_embed_dim": towers.dim, "normalize_prefix": True}
    elif towers is not None:
        overrides |= {"normalize_prefix": True}
    model = load_training_model(
        model_name_or_path=args.model_name_or_path,
        vision_model_name_or_path=args.vision_model_name_or_path,
        text_model_name_or_path=args.text_model_name_or_path,
        preset_config=read_preset(preset)["config"] if preset is not None else {},
        overrides=overrides,
    )
    if towers is not None and model.model.image_projection is not None and not args.model_name_or_path:
        with torch.no_grad():
            model.model.image_projection.weight.copy_(towers.image_projection)
    preset_tokenizer = preset if preset is not None and any(preset.glob("tokenizer*.json")) else None
    names = (args.tokenizer_name, args.model_name_or_path, args.text_model_name_or_path, preset_tokenizer)
    processor = load_training_processor(
        model,
        tokenizer_sources=names,
        image_processor_name=args.image_processor_name,
        image_processor_sources=(args.model_name_or_path, args.vision_model_name_or_path, preset),
    )
    tokenizer = processor.tokenizer
    if preset is not None and (preset / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(preset))
    else:
        generation = model.generation_config if args.model_name_or_path else GenerationConfig()
    generation.eos_token_id, generation.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    generation.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    generation.num_beams = args.num_beams or generation.num_beams
    generation.max_new_tokens = (
        args.max_new_tokens or generation.max_new_tokens or min(args.max_caption_length, 67)
    )
    model.generation_config = generation
    return model, processor


def text_only_rows(
    args: argparse.Namespace, towers: Any, source: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Text rows: every caption of ``source`` (default ``--train_file``; a caption file, or a .txt of one caption a
    line; no image is opened) as its text embedding plus noise (``text_only.NoisyTextEmbeddings``); returns the
    rows and what the noise was (``--noise_std``, else estimated on ``--noise_sample_size`` pairs of
    ``--noise_sample_file``, else CapDec's 0.126). ``--modality_shift``: the rows are also moved by the sample's
    mean gap, and the noise is the gap's residual."""
    from modeling_clipcap.retrieval import read_caption_source
    from modeling_clipcap.text_only import DEFAULT_NOISE_STD, NoisyTextEmbeddings, estimate_noise_std

    source = source or args.train_file
    _, captions, _ = read_caption_source(
        source, args.train_split if source == args.train_file else None, args.image_dir
    )
    if args.max_train_samples is not None and args.text_only:
        captions = captions[: args.max_train_samples]
    if not captions:
        raise ValueError(f"{source}: no captions to train on.")
    noise: dict[str, Any] = {"noise_std": args.noise_std, "source": "--noise_std"}
    shift = None
    if args.noise_sample_file and (args.noise_std is None or args.modality_shift):
        keys, sample_captions, images = read_caption_source(args.noise_sample_file, None, args.image_dir)
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if len(first) < args.noise_sample_size:
                first.setdefault(key, i)
        rows = list(first.values())
        gap = estimate_noise_std(towers, [images[i] for i in rows], [sample_captions[i] for i in rows])
        mean_gap = gap.pop("shift")  # (P,): kept out of the summary
        shift = mean_gap if args.modality_shift else None
        if args.noise_std is None:
            noise = gap | {"source": f"estimated on {args.noise_sample_file}"}
            if args.modality_shift:
                noise["noise_std"] = gap["residual_std"]
        noise["modality_shift"] = shift is not None
    elif args.noise_std is None:
        noise = {"noise_std": DEFAULT_NOISE_STD, "source": "CapDec's default (variance 0.016)"}
    logger.info(f"text rows: {len(captions)} captions of {source}, noise {noise}")
    embeddings = towers.encode_texts(captions, show_progress=True)
    return NoisyTextEmbeddings(embeddings, captions, noise["noise_std"], shift=shift), noise


def attach_retrieval(
    args: argparse.Namespace, model: Any, processor: Any, data: dict[str, Any], towers: Any = None
) -> list[list[str]] | None:
    """A retrieval-augmented model (``retrieval_k > 0``): retrieve ``retrieval_k`` captions from ``--datastore`` for
    every training image, leaving out its own captions (for text-only rows: for every caption, leaving out that
    caption), and for every validation image; the training rows get their prompts. Returns the validation images'
    retrieved captions (None without retrieval)."""
    from modeling_clipcap.retrieval import Datastore, retrieve_for_training
    from modeling_clipcap.towers import position_limit

    k, template = model.config.retrieval_k, model.config.retrieval_template
    if not k:
        if args.datastore:
            raise ValueError("--datastore is given but retrieval_k is 0; pass --retrieval_k N.")
        return None
    if not args.datastore:
        raise ValueError(f"retrieval_k={k}: give --datastore DIR (built by clipcap index) to retrieve from.")
    store = Datastore.load(args.datastore)
    text_rows = data["train"] if args.text_only else data.get("text_rows")
    if text_rows is not None:
        from modeling_clipcap.processing_clipcap import retrieval_prompt

        if store.info["modality"] != "text":
            raise ValueError(
                "text rows (--text_only/--text_file) with retrieval need a text datastore (clipcap index "
                "--modality text)."
            )
        if store.towers is None:
            store.attach(towers)
        retrieved = store.search(text_rows.embeddings.numpy(), k, exclude_captions=text_rows.captions)
        text_rows.prompts = [retrieval_prompt(r, template) for r in retrieved]
    if "train_images" in data:
        images = data["train_images"]
        data["train"].prompts, _ = retrieve_for_training(
            store, images["image"], images["image_id"], k, template, show_progress=True
        )
    elif not args.text_only:
        raise ValueError(
            "retrieval training reads images through the embedding cache (a frozen tower, no stream)."
        )
    validation_retrieved = None
    if "validation_images" in data:
        images = data["validation_images"]
        prompts, validation_retrieved = retrieve_for_training(
            store, images["image"], images["image_id"], k, template
        )
        data["val_captions"].prompts = prompts
    prompts = data["train"].prompts
    longest = max(len(ids) for ids in processor.tokenizer(prompts[: min(len(prompts), 2000)])["input_ids"])
    limit = position_limit(model.config.text_config)
    needed = model.config.prefix_length + longest + args.max_caption_length
    if limit is not None and needed > limit[1]:
        raise ValueError(
            f"prefix ({model.config.prefix_length}) + retrieval prompt (up to {longest} tokens) + caption "
            f"(--max_caption_length {args.max_caption_length}) = {needed} positions, more than the language model's "
            f"{limit[0]}={limit[1]}; lower --retrieval_k or --max_caption_length, or use a longer LM."
        )
    return validation_retrieved


def optimizer_step(
    accelerator: Accelerator, model: Any, optimizer: Any, lr_scheduler: Any, group: list, max_norm: float
) -> tuple[float, int]:
    """One optimizer step over a group of micro-batches; returns (mean token loss, caption tokens).

    Accelerate's documented accumulation for autoregressive models: the loss is normalised by the caption
    tokens of the whole step (all micro-batches and processes), and DDP syncs gradients only on the last
    micro-batch (``no_sync`` before it). A group may be short at the end of an epoch; the token count
    keeps its mean exact anyway.
    """
    local_tokens = sum((b["labels"] != -100).sum() for b in group)
    num_items = accelerator.reduce(local_tokens.to(accelerator.device), "sum").clamp_min(1)
    step_loss = torch.zeros((), device=accelerator.device)
    # loss = local token-loss sum / global tokens; Accelerate divides by the accumulation steps and DDP
    # averages over processes: undo both so that the update uses the exact global mean.
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    for index, batch in enumerate(group):
        last = index == len(group) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            outputs = model(**batch, num_items_in_batch=num_items, logits_to_keep=1)
            accelerator.backward(outputs.loss * scale)
        step_loss += outputs.loss.detach().float()
    if max_norm and max_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, "sum").item(), int(num_items.item())


def save_outputs(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: Any,
    processor: Any,
    summary: dict[str, Any],
    peft_model: Any = None,
) -> None:
    """The final model folder (when training finished), the skipped-image list and ``train_results.json``;
    then ``--push_to_hub``. With adapters (``peft_model``): their PEFT folder ``adapter/``, then the model folder
    with the adapters merged into the weights."""
    output_dir = Path(args.output_dir)
    finished = not summary["stopped_early"]
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if finished and peft_model is not None:
        if accelerator.is_main_process:
            save_adapter(peft_model, output_dir / ADAPTER_DIR, args.model_name_or_path)
        accelerator.wait_for_everyone()
        unwrapped = merge_adapters(peft_model)
    if finished:
        unwrapped.save_pretrained(
            output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
    if accelerator.is_main_process:
        if skipped := summary["skipped"]:
            record = {"count": len(skipped), "images": [list(s) for s in skipped]}
            (output_dir / "skipped_images.json").write_text(json.dumps(record, indent=2))
        if finished:
            processor.save_pretrained(output_dir)
            unwrapped.generation_config.save_pretrained(output_dir)
            bases = (args.vision_model_name_or_path, args.text_model_name_or_path, args.model_name_or_path)
            template = read_preset(args.preset)["card_template"] if args.preset is not None else None
            card = render_training_card(
                summary,
                unwrapped.config,
                model_id=args.hub_model_id or output_dir.name,
                base_models=bases,
                card_template=template,
            )
            card.save(output_dir / "README.md")
        summary["skipped_images"] = len(summary.pop("skipped"))
        (output_dir / "train_results.json").write_text(json.dumps(summary, indent=2, default=str))
    accelerator.wait_for_everyone()
    if args.push_to_hub and finished and accelerator.is_main_process:
        folder = output_dir
        if peft_model is not None and not args.push_merged_model:
            if is_public_hub_model(args.model_name_or_path, args.hub_token):
                folder = output_dir / ADAPTER_DIR  # the adapter alone: users load the public base + it
            else:
                accelerator.print(
                    f"The base model ({args.model_name_or_path or 'built from parts'}) is not a public Hub "
                    "model: pushing the merged model, not the adapter alone."
                )
        summary["hub_repo_id"] = push_folder(
            folder,
            args.hub_model_id,
            token=args.hub_token,
            private=args.hub_private_repo,
            commit_message=f"ClipCap training: {summary['completed_steps']} steps",
        )
        accelerator.print(f"Pushed to the Hub: {summary['hub_repo_id']}")


def print_summary(accelerator: Accelerator, summary: dict[str, Any], output_dir: Path) -> None:
    lines = [
        "***** Training summary *****",
        f"  steps: {summary['completed_steps']}/{summary['max_train_steps']}"
        + (" (stopped early, checkpoint saved)" if summary["stopped_early"] else ""),
        f"  training loss: first {summary['first_train_loss']}, last {summary['final_train_loss']}",
        f"  trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}",
        f"  processes: {summary['num_processes']}, total batch: {summary['total_batch_size']}, "
        f"precision: {summary['mixed_precision']}",
    ]
    for desc, stats in summary["embedding_cache"].items():
        lines.append(f"  {desc}: {stats['encoded']} encoded, {stats['reused']} from cache")
    lines += [f"  {key}: {value:.4f}" for key, value in summary["final_metrics"].items()]
    if summary["skipped_images"]:
        lines.append(
            f"  bad images skipped: {summary['skipped_images']} (listed in {output_dir / 'skipped_images.json'})"
        )
    lines.append(f"  output: {output_dir.resolve()}  ({summary['train_seconds']} s)")
    accelerator.print("\n".join(lines))


def save_training_checkpoint(
    accelerator: Accelerator, args: argparse.Namespace, name: str, step: int, epoch: int, batches: int
) -> None:
    """``checkpoints/<name>`` with the loop's position (``training_state.json``) and the launch it needs."""
    position = dict(completed_steps=step, epoch=epoch, batches_in_epoch=batches, seed=args.seed)
    total = captions_per_step(args, accelerator)
    launch = dict(num_processes=accelerator.num_processes, total_batch_size=total)
    save_checkpoint(accelerator, args.output_dir, name, position | launch, args.checkpoints_total_limit)


def adapter_summary(config: Any) -> dict[str, Any]:
    """The adapter settings recorded in ``train_results.json``."""
    record = config.to_dict()
    keep = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")
    values = {k: record[k] for k in keep if k in record}
    values["peft_type"] = getattr(values["peft_type"], "value", values["peft_type"])  # an Enum of str
    return values | {"modules_to_save": sorted(values.get("modules_to_save") or [])}


def captions_per_step(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """The total batch of an optimizer step: per device x processes x accumulation."""
    return args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps


def write_log(accelerator: Accelerator, args: argparse.Namespace, path: Path, record: dict[str, Any]) -> None:
    """One line of ``train_log.jsonl`` (main process, every step); the trackers of ``--report_to`` get every
    validation record and every ``--logging_steps``-th step."""
    record = {k: v for k, v in record.items() if k != "eval_samples"}
    validation = "loss" not in record
    if accelerator.is_main_process:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if validation:
            shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
            accelerator.print(f"step {record['step']}: {shown}")
    if args.report_to != "none" and (validation or record["step"] % args.logging_steps == 0):
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        accelerator.log(scalars, step=record["step"])


def optimized_modules(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Modules (``vision_model``, ``mapping_network``, ``language_model``) with a parameter the optimizer updates;
    names are taken below the base model (``base_model_prefix``), as ``from_pretrained`` would."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    names = (name.removeprefix(prefix) for name, p in model.named_parameters() if id(p) in ids)
    return sorted({name.split(".")[0] for name in names})


def setup_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator (precision, accumulation, trackers), logging per process, the seed, the output folder."""
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # Accumulation is driven explicitly (optimizer_step): a group of micro-batches per optimizer step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # the training shuffle: a permutation drawn from --seed + epoch alone, the same on every process, so a
        # resumed run and any split of the global batch over processes see the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if args.report_to != "none" and not filter_trackers(args.report_to, args.output_dir):
        raise ValueError(  # Accelerate would skip the tracker silently
            f"--report_to {args.report_to}: its package is not installed (e.g. pip install tensorboard); "
            "install it or pass --report_to none."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    verbosity = "warning" if accelerator.is_local_main_process else "error"
    datasets.utils.logging.set_verbosity(getattr(logging, verbosity.upper()))
    transformers.utils.logging.set_verbosity(getattr(logging, verbosity.upper()))
    if not accelerator.is_local_main_process:
        datasets.disable_progress_bars()
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        raise ValueError(
            f"--gradient_accumulation_steps={args.gradient_accumulation_steps} but the launch configuration "
            f"(e.g. the DeepSpeed config) uses {accelerator.gradient_accumulation_steps}; make them equal."
        )
    logger.info(accelerator.state, main_process_only=False)
    check_fsdp_requested(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    if args.report_to != "none":
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("clipcap", tracker_config)
    return accelerator


def check_fsdp_requested(accelerator: Accelerator) -> None:
    """Refuse a launch that asked for FSDP (``accelerate launch --use_fsdp`` or an FSDP config) when Accelerate
    did not turn it on: it enables FSDP only for GPU-like devices, so CPU processes would silently train with
    plain DDP, every process holding the whole model."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    if requested and accelerator.distributed_type != "FSDP":
        raise ValueError(
            f"FSDP was requested (--use_fsdp) but Accelerate runs {accelerator.distributed_type.value}: it enables "
            "FSDP on GPUs (and other accelerators) only, never on CPU processes. Launch on GPUs, or drop --use_fsdp "
            "to train with DDP (docs/training.md, sharded training)."
        )


def make_summary(
    args: argparse.Namespace, accelerator: Accelerator, data: dict[str, Any], optimizer: Any, model: Any
) -> dict[str, Any]:
    """What the run was: parameters, launch, data, hyper-parameters (the loop adds where it got to)."""
    unwrapped = accelerator.unwrap_model(model)
    total_batch_size = captions_per_step(args, accelerator)
    return run_report(accelerator, data) | {  # + samples_seen_per_rank, skipped_samples of a shard stream
        "trainable_parameters": unwrapped.num_parameters(only_trainable=True),
        "total_parameters": unwrapped.num_parameters(),
        "optimized_modules": optimized_modules(unwrapped, optimizer),
        "num_processes": accelerator.num_processes,
        "total_batch_size": total_batch_size,
        "mixed_precision": accelerator.mixed_precision,
        "embedding_cache": data["encode_stats"],
        "training_data": data["description"],
        "data_reports": data["reports"],
        "skipped": data["skipped"],
        "hyperparameters": {k: getattr(args, k) for k in HYPERPARAMETERS}
        | {"total_batch_size": total_batch_size, "mixed_precision": accelerator.mixed_precision},
    }


def make_optimizer(
    args: argparse.Namespace, model: Any, batches_per_process: int | None, num_processes: int
) -> tuple[torch.optim.Optimizer, Any, int, int]:
    """AdamW over the trainable parameters and the learning-rate schedule; returns them with the number of
    optimizer steps and epochs (``batches_per_process`` None: a stream, ``--max_train_steps`` in one epoch)."""
    optimizer = torch.optim.AdamW(optimizer_parameter_groups(model, args.weight_decay), lr=args.learning_rate)
    if batches_per_process is None:
        max_train_steps, num_epochs = args.max_train_steps, args.num_train_epochs
    else:
        steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # Accelerate steps a prepared scheduler once per process per optimizer step (the *_no_trainer convention).
    lr_scheduler = get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler, max_train_steps, num_epochs


def resume(
    args: argparse.Namespace, accelerator: Accelerator, total_batch_size: int, batches_per_epoch: int | None
) -> tuple[int, int, int]:
    """Restore ``--resume_from_checkpoint`` (model, optimizer, scheduler, RNG states); returns where to go on:
    ``(completed_steps, epoch, batches already seen in that epoch)``. Without one, re-seeds: data
    preparation may have used the global RNG (how much depends on what was cached)."""
    checkpoint = (
        find_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    )
    if checkpoint is None:
        if args.resume_from_checkpoint == "latest":
            logger.warning(
                f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}/checkpoints; starting fresh."
            )
        set_seed(args.seed)
        return 0, 0, 0
    expected = {"num_processes": accelerator.num_processes, "total_batch_size": total_batch_size}
    state = load_checkpoint(accelerator, checkpoint, expected, args.allow_rng_state_loss)
    accelerator.print(f"Resumed from checkpoint: {checkpoint}")
    if not args.streaming and state["batches_in_epoch"] >= batches_per_epoch:  # saved at the end of an epoch
        return state["completed_steps"], state["epoch"] + 1, 0
    return state["completed_steps"], state["epoch"], state["batches_in_epoch"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one training; returns the summary that is also printed and written to ``train_results.json``."""
    start, args = time.time(), parse_args(argv)
    accelerator = setup_accelerator(args)
    output_dir = Path(args.output_dir)

    # Model (with adapters) and data
    towers, noise = None, None
    if args.text_only or args.text_file:
        from modeling_clipcap.retrieval import load_towers

        towers = load_towers(args.towers or args.vision_model_name_or_path)
        args.vision_model_name_or_path = args.vision_model_name_or_path or args.towers
    model, processor = build_model_and_processor(args, towers)
    adapter_config = build_adapter_config(model, **{k: getattr(args, k) for k in ADAPTER_ARGUMENTS})
    peft_model = add_adapters(model, adapter_config) if adapter_config is not None else None
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    train_rows = None
    if args.text_only:
        train_rows, noise = text_only_rows(args, towers)
    data = build_datasets(
        accelerator,
        model,
        processor,
        train_rows=train_rows,
        **{k: getattr(args, k) for k in DATA_ARGUMENTS},
        shard_stream=lambda collator: build_train_stream(
            accelerator,
            collator,
            **{k: getattr(args, k) for k in STREAM_ARGUMENTS},
            mapping_input=model.config.mapping_input,
        ),
    )
    if args.text_file:
        if args.streaming or "image_embeds" not in data["train"][0]:
            raise ValueError(
                "--text_file joins text rows to image embeddings: it needs the frozen image tower's embedding "
                "cache (no --streaming, freeze_vision, --embedding_cache) or precomputed image_embeds."
            )
        data["text_rows"], noise = text_only_rows(args, towers, args.text_file)
    val_retrieved = attach_retrieval(args, model, processor, data, towers)
    if args.text_file:  # learn from text as well as pairs: the caption rows join the image rows
        data["train"] = torch.utils.data.ConcatDataset(
            [data["train"]] + [data["text_rows"]] * args.text_repeat
        )
        data["description"] += f" + {len(data['text_rows'])} text rows of {args.text_file}"
        if args.text_repeat > 1:
            data["description"] += f" (x{args.text_repeat})"
    train_dataloader, val_dataloaders = make_dataloaders(
        data,
        processor,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        max_caption_length=args.max_caption_length,
        preprocessing_num_workers=args.preprocessing_num_workers,
        streaming=args.streaming,
    )

    # Optimizer and schedule
    accum = args.gradient_accumulation_steps
    batches_per_process = (
        None if args.streaming else math.ceil(len(train_dataloader) / accelerator.num_processes)
    )
    optimizer, lr_scheduler, max_train_steps, num_epochs = make_optimizer(
        args, model, batches_per_process, accelerator.num_processes
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    val_loaders = {k: accelerator.prepare(v) for k, v in val_dataloaders.items()} if val_dataloaders else None
    total_batch_size = captions_per_step(args, accelerator)
    logger.info(
        f"***** Running training *****\n  {data['description']}, {num_epochs} epoch(s), {max_train_steps} "
        f"optimizer steps of {total_batch_size} captions ({args.per_device_train_batch_size} per device x "
        f"{accelerator.num_processes} processes x {accum} accumulation)"
    )

    # Resume
    completed_steps, starting_epoch, resume_batches = resume(
        args, accelerator, total_batch_size, None if args.streaming else len(train_dataloader)
    )

    # The loop
    log_path = output_dir / "train_log.jsonl"
    checkpoint_every = (
        int(args.checkpointing_steps) if str(args.checkpointing_steps or "").isdigit() else None
    )
    progress_bar = tqdm(
        range(max_train_steps),
        "Training",
        initial=completed_steps,
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    last_loss, first_loss, last_metrics, stopped_early, epoch = None, None, {}, False, starting_epoch
    for epoch in range(starting_epoch, num_epochs):
        if completed_steps >= max_train_steps or stopped_early:
            break
        batches_in_epoch = resume_batches if epoch == starting_epoch else 0
        skip = 0 if "train_loader" in data else batches_in_epoch  # a shard stream restores its own position
        batches = epoch_batches(train_dataloader, epoch, skip)
        while completed_steps < max_train_steps:
            group = [batch for _, batch in zip(range(accum), batches)]  # the micro-batches of one step
            if not group:
                break
            batches_in_epoch += len(group)
            last_loss, tokens = optimizer_step(
                accelerator, model, optimizer, lr_scheduler, group, args.max_grad_norm
            )
            first_loss = last_loss if first_loss is None else first_loss
            completed_steps += 1
            progress_bar.update(1)
            record = {"step": completed_steps, "epoch": epoch, "loss": last_loss, "tokens": tokens}
            write_log(accelerator, args, log_path, record | {"lr": lr_scheduler.get_last_lr()[0]})
            if completed_steps % args.logging_steps == 0 or completed_steps == 1:
                progress_bar.set_postfix(loss=f"{last_loss:.4f}")
            stopped_early = (
                bool(args.stop_after_steps) and args.stop_after_steps <= completed_steps < max_train_steps
            )
            if stopped_early or (checkpoint_every and completed_steps % checkpoint_every == 0):
                name = f"step_{completed_steps}"
                save_training_checkpoint(accelerator, args, name, completed_steps, epoch, batches_in_epoch)
            if args.eval_steps and completed_steps % args.eval_steps == 0 and val_loaders is not None:
                last_metrics = validate(
                    accelerator,
                    model,
                    processor,
                    val_loaders,
                    data["val_references"],
                    args.eval_meteor,
                    retrieved_captions=val_retrieved,
                )
                write_log(accelerator, args, log_path, {"step": completed_steps, **last_metrics})
            if stopped_early:
                break
        if args.checkpointing_steps == "epoch" and not stopped_early:
            name = f"epoch_{epoch}"
            save_training_checkpoint(accelerator, args, name, completed_steps, epoch, batches_in_epoch)
    progress_bar.close()
    if not stopped_early and val_loaders is not None:
        last_metrics = validate(
            accelerator,
            model,
            processor,
            val_loaders,
            data["val_references"],
            args.eval_meteor,
            retrieved_captions=val_retrieved,
        )
        write_log(accelerator, args, log_path, {"step": completed_steps, "final": True, **last_metrics})

    # Save, push, report
    summary = make_summary(args, accelerator, data, optimizer, model) | {
        "completed_steps": completed_steps,
        "max_train_steps": max_train_steps,
        "stopped_early": stopped_early,
        "epochs": epoch + 1,
        "final_train_loss": last_loss,
        "first_train_loss": first_loss,
        "final_metrics": {k: v for k, v in last_metrics.items() if isinstance(v, float)},
        "samples": last_metrics.get("eval_samples", []),
    }
    summary["hyperparameters"]["max_train_steps"] = max_train_steps
    if noise is not None:
        summary["text_only" if args.text_only else "text_rows"] = {k: v for k, v in noise.items()}
    if args.datastore:
        summary["datastore"] = str(args.datastore)
    summary["train_seconds"] = round(time.time() - start, 1)
    if peft_model is not None:
        summary["adapter"] = adapter_summary(adapter_config)
    # read from the model: whether its layers really recompute activations (--gradient_checkpointing)
    summary["activation_checkpointing"] = any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules()
    )
    save_outputs(args, accelerator, model, processor, summary, peft_model)
    accelerator.end_training()
    if accelerator.is_main_process:
        print_summary(accelerator, summary, output_dir)
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
