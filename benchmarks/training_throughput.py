"""Training throughput on cached CLIP embeddings: this package's step vs the original's habits.

Both paper recipes, real size, random weights, AdamW step included:

* ``mlp``: MLP mapper K=10, GPT-2 fine-tuned;
* ``transformer``: transformer mapper K=40 (clip_length 40, 8 layers), GPT-2 frozen.

Baseline ("original habits"), as the original ``train.py``: every caption padded to a fixed maximum length
(``--max-length``), GPT-2 run with its output layer on every position (prefix and padding included), loss
taken afterwards; with a frozen GPT-2 its parameters still ``requires_grad`` (only the optimizer leaves them
out), so backward computes GPT-2's weight gradients for nothing.

Ours: ``model(image_embeds=..., input_ids=..., attention_mask=..., labels=...)`` with dynamic padding (each
batch padded to its own longest caption; batches formed from length-sorted buckets when ``--sort``), the
output layer only on the caption positions, and ``freeze_language_model=True`` so no GPT-2 weight
gradients exist. Caption lengths follow a COCO-like distribution (GPT-2 tokens, 8 to 25, mean about 13).

    python benchmarks/training_throughput.py            # batch 8, 3 steps per variant, 1 and 2 threads
    python benchmarks/training_throughput.py --quick    # batch 4, 2 steps, 1 thread
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build_model,
    count_gpt2_gflops_per_token,
    mapper_gflops,
    matmul_gflops,
    measure,
    parse_int_list,
    print_table,
    set_threads,
    write_json,
)

VOCAB = 50257


def caption_lengths(n: int, seed: int = 0) -> list[int]:
    """COCO-like caption lengths in GPT-2 tokens (8..25, mean about 13)."""
    g = torch.Generator().manual_seed(seed)
    lengths = (13 + 3 * torch.randn(n, generator=g)).round().clamp(8, 25)
    return [int(v) for v in lengths]


def make_batches(lengths: list[int], batch: int, sort: bool) -> list[list[int]]:
    """Indices per batch; with ``sort`` the batches come from length-sorted order (then shuffled)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if sort else list(range(len(lengths)))
    batches = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
    g = torch.Generator().manual_seed(1)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def ours_step(model: Any, optimizer: Any, embeds: torch.Tensor, lengths: list[int]) -> None:
    """Dynamic padding to the batch's longest caption; loss on caption tokens only."""
    width = max(lengths)
    ids = torch.randint(0, VOCAB - 1, (len(lengths), width))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    # logits_to_keep=1: no full-vocabulary logits beyond the loss's (as training/train.py does)
    loss = model(
        image_embeds=embeds, input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=1
    ).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def original_step(
    model: Any, optimizer: Any, embeds: torch.Tensor, lengths: list[int], max_length: int
) -> None:
    """Original habits: pad to ``max_length``, logits on every position, then the caption loss."""
    ids = torch.randint(0, VOCAB - 1, (len(lengths), max_length))
    mask = (torch.arange(max_length)[None, :] < torch.tensor(lengths)[:, None]).long()
    prefix, _ = model.get_prefix(image_embeds=embeds)
    k = prefix.shape[1]
    gpt = model.language_model
    inputs = torch.cat([prefix, gpt.transformer.wte(ids)], dim=1)
    full_mask = torch.cat([torch.ones(len(lengths), k, dtype=torch.long), mask], dim=1)
    logits = gpt(inputs_embeds=inputs, attention_mask=full_mask, use_cache=False).logits  # (B, K + T, V)
    caption_logits = logits[:, k - 1 : -1]
    loss = F.cross_entropy(caption_logits.reshape(-1, VOCAB), ids.masked_fill(mask == 0, -100).reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_gflops_per_sample(model: Any, positions: float, caption_tokens: float, frozen_lm: bool) -> float:
    """Necessary training work per sample: mapper fwd+bwd (3x) and GPT-2 over K + caption positions: forward,
    activation gradients (1x), weight gradients (1x, not when frozen); output layer on caption tokens only."""
    body, head = count_gpt2_gflops_per_token(model)
    factor = 2 if frozen_lm else 3
    return 3 * mapper_gflops(model) + factor * (positions * body + caption_tokens * head)


def run_variant(
    recipe: str, method: str, batch: int, steps: int, lengths: list[int], max_length: int, sort: bool
) -> dict[str, Any]:
    frozen = recipe == "transformer"
    model = build_model(recipe, freeze_language_model=frozen and method == "ours")
    model.train()
    if model.vision_model is not None:
        model.vision_model = None  # cached embeddings: the CLIP tower is not part of a training step
        gc.collect()
    if frozen and method == "original":
        params = list(model.mapping_network.parameters())  # GPT-2 keeps requires_grad=True, as the original
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5)
    embeds_all = torch.randn(len(lengths), model.config.image_embed_dim)
    batches = make_batches(lengths, batch, sort=sort and method == "ours")

    def step(i: int) -> None:
        idx = batches[i % len(batches)]
        embeds = embeds_all[idx]
        lens = [lengths[j] for j in idx]
        if method == "ours":
            ours_step(model, optimizer, embeds, lens)
        else:
            original_step(model, optimizer, embeds, lens, max_length)

    step(0)  # warm-up (optimizer state allocated)
    times: list[float] = []

    def timed_steps() -> None:
        for i in range(1, steps + 1):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)

    result = measure(timed_steps)
    result["seconds"] = sorted(times)[len(times) // 2] * steps  # median step (the host is shared)
    used = [lengths[j] for i in range(1, steps + 1) for j in batches[i % len(batches)]]
    k = model.config.prefix_length
    mean_len = sum(used) / len(used)
    gflops = train_gflops_per_sample(model, k + mean_len, mean_len, frozen)
    row = {
        "recipe": "transformer K=40, GPT-2 frozen" if frozen else "mlp K=10, GPT-2 tuned",
        "method": method,
        "batch": batch,
        "steps": steps,
        "seconds": result["seconds"],
        "samples/s": batch * steps / result["seconds"],
        "necessary GFLOP/s": gflops * batch * steps / result["seconds"],
        "peak MiB": result["peak_rss_mb"],
        "growth MiB": result["peak_growth_mb"],
    }
    gc.collect()
    return row


def _child(threads: int, *args: Any) -> dict[str, Any]:
    set_threads(threads)
    return run_variant(*args)


def in_subprocess(threads: int, *args: Any) -> dict[str, Any]:
    """Run one variant in a fresh process, so that its peak RSS is its own."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child, (threads, *args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--max-length", type=int, default=40, help="the baseline's fixed caption length")
    parser.add_argument("--recipes", default="transformer,mlp")
    parser.add_argument("--no-sort", action="store_true", help="do not form batches from length-sorted order")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--quick", action="store_true", help="batch 4, 2 steps, 1 thread, transformer recipe")
    parser.add_argument("--name", default="training_throughput")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.threads, args.recipes = 4, 2, "1", "transformer"
        args.name = args.name + "_quick" if args.name == "training_throughput" else args.name
    started = time.time()
    lengths = caption_lengths(max(64, args.batch * (args.steps + 2)))
    rows, limits = [], {}
    for threads in parse_int_list(args.threads):
        set_threads(threads)
        limits[str(threads)] = limit = matmul_gflops(torch.float32)
        for recipe in [r for r in args.recipes.split(",") if r]:
            base = run_variant(recipe, "original", args.batch, args.steps, lengths, args.max_length, False)
            ours = run_variant(
                recipe, "ours", args.batch, args.steps, lengths, args.max_length, not args.no_sort
            )
            for row in (base, ours):
                row["threads"] = threads
                row["% limit"] = 100 * row["necessary GFLOP/s"] / limit
            ours["speedup"] = ours["samples/s"] / base["samples/s"]
            ours["memory ratio"] = ours["peak MiB"] / base["peak MiB"]
            rows += [base, ours]
            print(base, ours, sep="\n", flush=True)
    columns = [
        "threads", "recipe", "method", "batch", "samples/s", "speedup", "% limit", "peak MiB",
        "growth MiB", "memory ratio",
    ]  # fmt: skip
    print_table(rows, columns, title="Training throughput (cached embeddings, AdamW step included)")
    write_json(
        args.name,
        {
            "args": vars(args),
            "matmul_fp32_gflops": limits,
            "rows": rows,
            "wall_seconds": time.time() - started,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
