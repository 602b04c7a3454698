#!/usr/bin/env python
"""Pretrain a tiny CLIP contrastively on a captioned image folder (the demo's stand-in for OpenAI CLIP).

No pretrained CLIP can be downloaded offline, so the demo trains its own: a small ViT image tower and a
small text tower, with transformers' ``CLIPModel(..., return_loss=True)`` (the symmetric cross-entropy over
the batch's image-text cosine similarities, learned temperature). The result is saved with
``save_pretrained`` together with a ``CLIPImageProcessor`` and the tokenizer, so
``training/train.py --vision_model_name_or_path OUT`` (``from_vision_text_pretrained``) takes its vision
tower and visual projection as a frozen ClipCap encoder.

    python training/pretrain_clip.py --train_file data/shapes/train/metadata.jsonl \
        --config hub_configs/clipcap-synthetic-tiny --tokenizer_name demo_output/tokenizer \
        --output_dir demo_output/clip --max_steps 600

Text side: the captioning tokenizer (GPT-2 style, ``<|endoftext|>`` as bos = eos) gets an extra
``<|startoftext|>`` bos token, because the CLIP text tower pools at the *first* eos token: each caption
becomes ``<|startoftext|> caption <|endoftext|>`` padded with ``<|endoftext|>``.

Images are decoded once into a uint8 tensor (N, 3, H, W) (the synthetic images are small: 20k 64x64
images take 245 MB) and normalised per batch with the image processor's mean and std; each step pairs
every image of the batch with one of its reference captions, drawn at random.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python training/pretrain_clip.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from modeling_clipcap.image_io import load_image  # noqa: E402

BOS_TOKEN = "<|startoftext|>"

#: defaults, overridden by the preset's ``clip_pretraining.json`` and then by the command line
DEFAULTS: dict[str, Any] = {
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
    },
    "batch_size": 256,
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 50,
    "max_steps": 600,
    "max_minutes": None,
    "seed": 0,
}


def read_metadata(
    train_file: str | Path, image_dir: str | Path | None = None
) -> tuple[list[Path], list[list[str]]]:
    """Image paths and their reference captions from an image folder's ``metadata.jsonl``.

    Each line is ``{"file_name": ..., "captions": [...]}`` (or ``"caption": str``); paths are relative to
    ``image_dir`` (default: the folder of ``train_file``).
    """
    train_file = Path(train_file)
    if train_file.is_dir():
        train_file = train_file / "metadata.jsonl"
    if not train_file.is_file():
        raise FileNotFoundError(
            f"--train_file {train_file} does not exist; pass an image folder's metadata.jsonl."
        )
    root = Path(image_dir) if image_dir is not None else train_file.parent
    paths: list[Path] = []
    captions: list[list[str]] = []
    with open(train_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            caps = row.get("captions") or ([row["caption"]] if "caption" in row else [])
            if not caps or "file_name" not in row:
                raise ValueError(f"{train_file}:{line_no}: needs 'file_name' and 'captions' (or 'caption').")
            paths.append(root / row["file_name"])
            captions.append([str(c) for c in caps])
    if not paths:
        raise ValueError(f"{train_file} lists no images.")
    return paths, captions


def load_pixels(paths: list[Path], image_size: int, show_progress: bool = True) -> torch.Tensor:
    """Decode and resize images into a uint8 tensor (N, 3, image_size, image_size)."""
    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="reading images", unit="img", disable=not show_progress)):
        image = load_image(path)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size))
        out[i] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def normalize(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) the way CLIPImageProcessor does (rescale 1/255, normalise)."""
    x = pixels.float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def build_clip(
    tokenizer_name: str | Path,
    captions: list[list[str]],
    vision_config: dict[str, Any],
    text_config: dict[str, Any] | None,
) -> tuple[Any, Any, Any, list[torch.Tensor]]:
    """A randomly initialised ``CLIPModel`` sized for the captions, its tokenizer (a ``<|startoftext|>`` bos
    added) and image processor, and per image its captions' token ids (n_captions, L), padded with eos."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_name))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_name} has no eos token.")
    tokenizer.add_special_tokens({"bos_token": BOS_TOKEN})
    tokenizer.pad_token = tokenizer.eos_token
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert bos_id != eos_id, "CLIP's text tower needs eos != bos (it pools at the first eos)"

    text_fields = dict(DEFAULTS["text_config"])
    text_fields.update(text_config or {})
    all_ids = [
        [bos_id, *tokenizer(c, add_special_tokens=False)["input_ids"], eos_id]
        for caps in captions
        for c in caps
    ]
    longest = max(len(x) for x in all_ids)
    text_fields["max_position_embeddings"] = max(text_fields.get("max_position_embeddings", 0), longest)
    text_fields.update(
        vocab_size=len(tokenizer), bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id
    )
    vision_fields = dict(vision_config)
    projection_dim = vision_fields.get("projection_dim", 512)
    config = CLIPConfig(
        text_config={**text_fields, "projection_dim": projection_dim},
        vision_config=vision_fields,
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    image_size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # per image: its captions' token ids, padded to one length with eos
    width = longest
    caption_ids: list[torch.Tensor] = []
    cursor = 0
    for caps in captions:
        rows = all_ids[cursor : cursor + len(caps)]
        cursor += len(caps)
        caption_ids.append(torch.tensor([r + [eos_id] * (width - len(r)) for r in rows], dtype=torch.long))

    return model, tokenizer, image_processor, caption_ids


def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then a cosine to 0 at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain_clip(
    train_file: str | Path,
    output_dir: str | Path,
    vision_config: dict[str, Any],
    tokenizer_name: str | Path,
    text_config: dict[str, Any] | None = None,
    image_dir: str | Path | None = None,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    max_steps: int = 600,
    max_minutes: float | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a CLIPModel contrastively and save it (plus image processor and tokenizer) to ``output_dir``.

    Args:
        vision_config: ``CLIPVisionConfig`` fields (``image_size``, ``patch_size``, ``hidden_size``,
            ``projection_dim``, ...); ``projection_dim`` is the joint embedding width.
        tokenizer_name: the captioning tokenizer (GPT-2 style); a ``<|startoftext|>`` bos is added.
        text_config: ``CLIPTextConfig`` fields (width, depth); vocabulary and special ids come from the tokenizer.
        max_steps: optimizer steps (the cosine schedule's length); ``max_minutes`` stops earlier if set.

    Returns:
        A summary: steps, final loss (mean of the last 20 steps), in-batch retrieval accuracy on the last
        batches, seconds, and the output folder.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    start = time.time()
    paths, captions = read_metadata(train_file, image_dir)
    if max_train_samples is not None:
        paths, captions = paths[:max_train_samples], captions[:max_train_samples]
    if len(paths) < 2:
        raise ValueError("contrastive pretraining needs at least 2 images.")
    batch_size = min(batch_size, len(paths))

    model, tokenizer, image_processor, caption_ids = build_clip(
        tokenizer_name, captions, vision_config, text_config
    )
    image_size = model.config.vision_config.image_size
    pixels = load_pixels(paths, image_size, show_progress=show_progress)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
    )

    schedule = functools.partial(cosine_with_warmup, warmup_steps=warmup_steps, max_steps=max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    accuracies: list[float] = []
    step = 0
    deadline = start + max_minutes * 60 if max_minutes else None
    bar = tqdm(total=max_steps, desc="CLIP pretraining", unit="step", disable=not show_progress)
    while step < max_steps:
        if deadline is not None and time.time() > deadline:
            break
        if len(order) < batch_size:
            order = list(range(len(paths)))
            rng.shuffle(order)
        batch, order = order[:batch_size], order[batch_size:]
        pixel_values = normalize(pixels[batch], image_processor.image_mean, image_processor.image_std)
        input_ids = torch.stack([caption_ids[i][rng.randrange(caption_ids[i].shape[0])] for i in batch])
        out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            hits = (out.logits_per_image.argmax(dim=1) == torch.arange(len(batch))).float().mean().item()
        losses.append(out.loss.item())
        accuracies.append(hits)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", i2t_acc=f"{hits:.2f}")
    bar.close()

    model.eval()
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "steps": step,
        "train_images": len(paths),
        "batch_size": batch_size,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "final_in_batch_image_to_text_accuracy": float(np.mean(accuracies[-20:])) if accuracies else None,
        "seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "output_dir": str(out_dir),
    }
    (out_dir / "pretrain_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a tiny CLIP contrastively (CLIPModel, return_loss=True)."
    )
    p.add_argument("--train_file", required=True, help="an image folder's metadata.jsonl (or the folder)")
    p.add_argument(
        "--image_dir", default=None, help="folder the file names are relative to (default: its folder)"
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tokenizer_name", required=True, help="the captioning tokenizer folder")
    p.add_argument(
        "--config",
        default=None,
        help="preset folder: vision tower from its config.json, pretraining settings from clip_pretraining.json",
    )
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=None)
    p.add_argument("--warmup_steps", type=int, default=None)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--max_minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = dict(DEFAULTS)
    vision_config: dict[str, Any] = {}
    if args.config is not None:
        preset = Path(args.config)
        if not preset.is_dir():
            preset = REPO_ROOT / "hub_configs" / args.config
        if not preset.is_dir():
            print(f"error: --config {args.config}: no such preset folder.", file=sys.stderr)
            return 2
        if (preset / "config.json").is_file():
            vision_config = json.loads((preset / "config.json").read_text()).get("vision_config") or {}
        if (preset / "clip_pretraining.json").is_file():
            settings.update(
                {
                    k: v
                    for k, v in json.loads((preset / "clip_pretraining.json").read_text()).items()
                    if k != "_comment"
                }
            )
    if not vision_config:
        print(
            "error: no vision tower config: pass --config a preset whose config.json has vision_config.",
            file=sys.stderr,
        )
        return 2
    for key in (
        "batch_size",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "max_steps",
        "max_minutes",
        "seed",
    ):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    vision_config = {
        k: v for k, v in vision_config.items() if k not in ("model_type", "transformers_version")
    }
    try:
        summary = pretrain_clip(
            args.train_file,
            args.output_dir,
            vision_config=vision_config,
            tokenizer_name=args.tokenizer_name,
            text_config=settings.get("text_config"),
            image_dir=args.image_dir,
            batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            weight_decay=settings["weight_decay"],
            warmup_steps=settings["warmup_steps"],
            max_steps=settings["max_steps"],
            max_minutes=settings["max_minutes"],
            seed=settings["seed"],
            max_train_samples=args.max_train_samples,
            show_progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
