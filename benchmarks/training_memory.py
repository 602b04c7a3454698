#!/usr/bin/env python
"""Peak memory and step time of training a bigger language model: frozen, LoRA, full fine-tuning, each with and
without activation (gradient) checkpointing, at a fixed batch, one run.

    python benchmarks/training_memory.py --language_models qwen2-0.5b --batch 2 --tokens 16 --steps 2
    python benchmarks/training_memory.py --language_models gpt2 --batch 2 --tokens 16 --steps 3
    python benchmarks/training_memory.py --quick    # GPT-2 only, 2 steps

(the two commands docs/performance.md reports: one JSON per language model, ``--output``).

The language models are random-weight configs of real size (no weights offline): ``qwen2-0.5b`` is
Qwen2.5-0.5B's architecture (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936,
tied embeddings: 494M parameters), ``gpt2`` GPT-2 small (124M). The ClipCap model around them takes cached
image embeddings (512-d, the CLIP ViT-B/32 width) through the paper's MLP mapper (K=10), as train.py does with
a frozen tower. Every step is what train.py does: forward with the loss on the caption tokens only, backward,
AdamW over the trainable parameters (``training_utils.optimizer_parameter_groups``), in fp32 or, with
``--precision bf16``, under bf16 autocast (Accelerate's ``--mixed_precision bf16``; fp32 master weights). The
default is fp32: on a CPU without native bf16 units (docs/performance.md) bf16 matmuls are emulated and far
slower, and on a loaded machine a bf16 run of the 0.5B model did not finish in the time it had. LoRA is ``modeling_clipcap.adapters`` (rank 16,
every linear layer of the LM), checkpointing ``adapters.enable_activation_checkpointing``.

Each configuration runs in a fresh subprocess; its peak memory is the kernel's peak resident set size of that
process (``ru_maxrss``), so one configuration's allocations never hide another's. Reported: the RSS once the
model is built (weights + interpreter), the peak, their difference (what training adds: gradients, optimizer
state, activations), and the median step time after one warm-up step. Per-parameter costs derived from these
numbers are in docs/performance.md with the 7B-on-24 GB estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

LANGUAGE_MODELS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "gpt2": {"model_type": "gpt2"},
}
MODES = ("frozen", "lora", "full")
LORA_RANK = 16


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(lm: str, mode: str, checkpointing: bool) -> Any:
    """The ClipCap model of one configuration, ready to train (adapters injected, checkpointing on)."""
    import torch
    from transformers import AutoConfig

    from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration
    from modeling_clipcap.adapters import add_adapters, build_adapter_config, enable_activation_checkpointing

    spec = dict(LANGUAGE_MODELS[lm])
    text_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config = ClipCapConfig(
        vision_config=None,
        image_embed_dim=512,
        text_config=text_config,
        mapping_type="mlp",
        prefix_length=10,
        freeze_language_model=mode == "frozen",
    )
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config)
    if mode == "lora":
        add_adapters(model, build_adapter_config(model, lora_r=LORA_RANK, lora_target_modules=["all-linear"]))
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def worker(
    lm: str, mode: str, checkpointing: bool, batch: int, tokens: int, steps: int, threads: int, precision: str
) -> dict:
    """One configuration in this (fresh) process: build, train ``steps`` steps, report memory and time."""
    import torch

    from modeling_clipcap.training_utils import optimizer_parameter_groups

    torch.set_num_threads(threads)
    rss_start = _rss_mib()
    model = build(lm, mode, checkpointing)
    rss_built = _rss_mib()
    optimizer = torch.optim.AdamW(optimizer_parameter_groups(model), lr=1e-5)
    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(batch, 512, generator=generator)
    input_ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(
                image_embeds=image_embeds, input_ids=input_ids, labels=input_ids, logits_to_keep=1
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "language_model": lm,
        "mode": mode,
        "checkpointing": checkpointing,
        "total_parameters": sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rss_start_mib": round(rss_start, 1),
        "rss_built_mib": round(rss_built, 1),
        "peak_rss_mib": round(peak, 1),
        "training_overhead_mib": round(peak - rss_built, 1),
        "step_seconds": round(statistics.median(times[1:] or times), 3),
        "step_times": [round(t, 3) for t in times],
        "final_loss": round(float(loss), 4),
    }


def run_configuration(lm: str, mode: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", json.dumps([lm, mode, checkpointing])]
    cmd += ["--batch", str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads), "--precision", args.precision]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "language_model": lm,
            "mode": mode,
            "checkpointing": checkpointing,
            "error": proc.stderr[-2000:],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| LM | training | checkpointing | trainable params | built RSS MiB | peak RSS MiB | peak - built MiB "
        "| step s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['language_model']} | {r['mode']} | {r['checkpointing']} | error | | | | |")
            continue
        lines.append(
            f"| {r['language_model']} | {r['mode']} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{r['trainable_parameters']:,} | {r['rss_built_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
            f"{r['training_overhead_mib']:,.0f} | {r['step_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--language_models", nargs="+", default=list(LANGUAGE_MODELS), choices=list(LANGUAGE_MODELS)
    )
    p.add_argument("--batch", type=int, default=4, help="Captions per step.")
    p.add_argument("--tokens", type=int, default=32, help="Caption tokens per caption (+ K=10 prefix).")
    p.add_argument("--steps", type=int, default=3, help="Steps per configuration (the first is a warm-up).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights."
    )
    p.add_argument("--quick", action="store_true", help="GPT-2 only, 2 steps.")
    p.add_argument("--output", default=str(BENCH_DIR / "results" / "training_memory.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        lm, mode, checkpointing = json.loads(args.worker)
        row = worker(
            lm, mode, checkpointing, args.batch, args.tokens, args.steps, args.threads, args.precision
        )
        print(json.dumps(row))
        return 0
    if args.quick:
        args.language_models, args.steps = ["gpt2"], 2

    from common import cpu_info

    rows, start = [], time.time()
    for lm in args.language_models:
        for mode in MODES:
            for checkpointing in (False, True):
                rows.append(run_configuration(lm, mode, checkpointing, args))
                print(render_table(rows[-1:]).splitlines()[-1], flush=True)
    record = {
        "settings": {k: getattr(args, k) for k in ("batch", "tokens", "steps", "threads")}
        | {"lora_rank": LORA_RANK, "precision": args.precision},
        "machine": cpu_info(),
        "seconds": round(time.time() - start, 1),
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + render_table(rows))
    print(f"\n{args.output} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
