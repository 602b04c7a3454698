"""The training part of the GPU run: a few hundred bf16 mixed-precision steps under ``accelerate launch``.

The paper's default recipe at real size with random weights (MLP mapper K=10, GPT-2 124M fine-tuned, AdamW,
lr 2e-5, batch 40) trained from cached image embeddings (random, as ``clipcap embed`` would store them) and
random captions of COCO-like lengths (8..25 tokens, dynamic padding, loss on caption tokens only): the step
``training/train.py`` runs, through ``Accelerator`` (mixed precision from ``accelerate launch``). Reports the
median step time, samples/s and the peak device memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the
process's peak RSS) as JSON.

    accelerate launch --num_processes 1 --mixed_precision bf16 benchmarks/gpu_train.py --out FILE.json
    accelerate launch --cpu --num_processes 1 --mixed_precision bf16 benchmarks/gpu_train.py --smoke --out F
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from common import build_model, peak_rss_mb
    from gpu_run import build_smoke_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 6 steps")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch = 6, 4

    accelerator = Accelerator()
    torch.manual_seed(0)
    model = build_smoke_model() if args.smoke else build_model("mlp")
    model.vision_model = None  # cached embeddings: the tower is not part of a training step
    model.train()
    vocab = model.config.text_config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    g = torch.Generator().manual_seed(0)
    embed_dim = accelerator.unwrap_model(model).config.image_embed_dim

    def batch_tensors() -> dict[str, torch.Tensor]:
        lengths = (13 + 3 * torch.randn(args.batch, generator=g)).round().clamp(8, 25).long()
        width = int(lengths.max())
        ids = torch.randint(0, vocab - 1, (args.batch, width), generator=g)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {
            "image_embeds": torch.randn(args.batch, embed_dim, generator=g).to(device),
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "labels": ids.masked_fill(mask == 0, -100).to(device),
        }

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, loss = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps + 1):
        batch = batch_tensors()
        synchronize()
        t0 = time.perf_counter()
        with accelerator.autocast():
            loss = model(**batch, logits_to_keep=1).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step > 0:  # step 0 allocates the optimizer state
            times.append(time.perf_counter() - t0)
        if step % 50 == 0 and accelerator.is_main_process:
            print(f"  step {step}: loss {loss.item():.4f}", flush=True)
    median = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    result = {
        "recipe": "mlp K=10, GPT-2 tuned" + (" (tiny)" if args.smoke else ""),
        "device": str(device),
        "mixed_precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes,
        "batch": args.batch,
        "steps": args.steps,
        "median step s": median,
        "mean step s": sum(times) / len(times),
        "samples/s": args.batch * accelerator.num_processes / median,
        "peak MiB": peak,
        "final loss": float(loss.item()),
    }
    if accelerator.is_main_process:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
