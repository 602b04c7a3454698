#!/usr/bin/env python
"""Continue training a causal language model on a text corpus, before ClipCap training (a LM that has read the
domain).

    python training/pretrain_lm.py --model_name_or_path demo_output/gpt2 \
        --train_file demo_output/data/corpus/captions.txt --output_dir demo_output/gpt2_read --max_steps 300

Real language models arrive pretrained; a domain's own text (product descriptions, reports, the captions of other
image sets) still teaches them its words and phrasings, including the ones no image-caption pair shows. Each line
of ``--train_file`` (a .txt file, one text a line, or any caption file ``clipcap index --data`` reads: its
captions) becomes ``bos text eos``; the loss is the usual next-token loss on the text and eos. Written as an
Accelerate loop (one CPU, one GPU, several): AdamW, linear warm-up and decay, batches drawn from a seeded
shuffle. The result is saved with ``save_pretrained`` (safetensors) with its tokenizer, ready for
``training/train.py --text_model_name_or_path OUT``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python training/pretrain_lm.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))


def build_parser() -> argparse.ArgumentParser:
    from modeling_clipcap.cli import add_bool_argument

    p = argparse.ArgumentParser(
        description="Continue training a causal LM on a text corpus (one text a line)."
    )
    p.add_argument("--model_name_or_path", required=True, help="A causal LM checkpoint (GPT-2, Llama, ...).")
    p.add_argument("--tokenizer_name", help="Tokenizer (default: the model's).")
    p.add_argument("--train_file", required=True, help="A .txt corpus (one text a line) or a caption file.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--per_device_train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_warmup_steps", type=int, default=30)
    p.add_argument("--max_length", type=int, default=48, help="Tokens per text, bos and eos included.")
    p.add_argument("--seed", type=int, default=0)
    add_bool_argument(p, "progress", default=True, help="progress bar")
    return p


def read_texts(path: str) -> list[str]:
    """The corpus: the lines of a .txt file, or the captions of a caption file."""
    from modeling_clipcap.retrieval import read_caption_source

    _, texts, _ = read_caption_source(path)
    if not texts:
        raise ValueError(f"--train_file {path}: no text in it.")
    return texts


def encode(texts: list[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Each text as ``bos ids eos`` (cut to ``max_length``)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[bos, *x[: max_length - 2], tokenizer.eos_token_id] for x in ids]


def next_token_loss(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token cross-entropy of ``model`` on ``inputs`` (``input_ids`` / ``attention_mask`` / ``labels``
    (B, T), padding labelled -100): what ``model(labels=...).loss`` gives, computed here from the logits, so that
    language models whose class name transformers maps to no loss (GPT-2's ``GPT2LMHeadModel``) do not warn."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), inputs["labels"][:, 1:].flatten(), ignore_index=-100
    )


def collate(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, T) and ``labels`` (padding -100)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def pretrain_lm(args: argparse.Namespace) -> dict[str, Any]:
    """The loop; returns a summary (also written to ``output_dir/pretrain_lm_results.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    start = time.time()
    accelerator = Accelerator()
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set one (GPT-2: '<|endoftext|>').")
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    rows = encode(read_texts(args.train_file), tokenizer, args.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler("linear", optimizer, args.num_warmup_steps, args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(args.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(
        range(args.max_steps), desc="LM training", disable=not (args.progress and accelerator.is_main_process)
    )
    for _ in bar:
        if len(order) < args.per_device_train_batch_size:
            order = list(range(len(rows)))
            rng.shuffle(order)
        batch, order = order[: args.per_device_train_batch_size], order[args.per_device_train_batch_size :]
        inputs = {k: v.to(accelerator.device) for k, v in collate([rows[i] for i in batch], pad_id).items()}
        loss = next_token_loss(model, inputs)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    out = Path(args.output_dir)
    summary = {
        "texts": len(rows),
        "steps": len(losses),
        "first_loss": sum(losses[:10]) / max(1, len(losses[:10])),
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "seconds": round(time.time() - start, 1),
        "output_dir": str(out),
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "pretrain_lm_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_steps", "per_device_train_batch_size"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}.", file=sys.stderr)
            return 2
    try:
        summary = pretrain_lm(args)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
