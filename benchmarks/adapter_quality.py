#!/usr/bin/env python
"""Quality of LoRA adapters on the synthetic benchmark: LoRA at two ranks vs a frozen LM vs full fine-tuning.

    python benchmarks/adapter_quality.py --demo_dir demo_output     # after `python training/demo.py`

Every variant is ``training/train.py`` with the demo's own command (its data, tokenizer, pretrained tiny
CLIP tower ``clip/`` and tiny GPT-2 ``gpt2/`` as the base, preset ``clipcap-synthetic-tiny``: batch 64,
lr 1e-3, ``train_steps`` steps, seed) plus one flag set, then the demo's ``clipcap evaluate`` on test and
test_novel (CIDEr-D, exact match by object count). Only the language-model treatment differs:

* ``full``: the demo's recipe (mapper + every GPT-2 weight);
* ``frozen``: ``--freeze_language_model`` (mapper only);
* ``lora_r<R>``: ``--lora_r R --lora_target_modules all-linear`` (mapper + LoRA on every GPT-2 linear layer).

``--reuse_full`` takes the full fine-tuning numbers from the demo's own report (the same command, already run).
Writes ``benchmarks/results/adapter_quality.json`` and prints the table of docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "training"))

import demo  # noqa: E402  (training/demo.py: its train command and evaluation)

from modeling_clipcap.cli import add_bool_argument  # noqa: E402


def variant_flags(name: str) -> list[str]:
    """The train.py flags of a variant (``full``, ``frozen`` or ``lora_r<R>``)."""
    if name == "full":
        return []
    if name == "frozen":
        return ["--freeze_language_model"]
    if name.startswith("lora_r"):
        return ["--lora_r", name.removeprefix("lora_r"), "--lora_target_modules", "all-linear"]
    raise ValueError(f"unknown variant {name!r}: full, frozen or lora_r<R>.")


def run_variant(
    name: str, demo_dir: Path, out: Path, cfg: dict[str, Any], env: dict[str, str], reuse: bool = False
) -> dict[str, Any]:
    """Train and evaluate one variant under ``out/<name>``; ``reuse``: keep a finished run's model and scores."""
    model_dir, eval_root = out / name, out / f"{name}-evaluate"
    cmd = demo.train_command(demo_dir / "data", model_dir, demo_dir / "embedding_cache", cfg)
    cmd += ["--config", str(demo.PRESET), "--vision_model_name_or_path", str(demo_dir / "clip")]
    cmd += ["--text_model_name_or_path", str(demo_dir / "gpt2")]
    cmd += ["--tokenizer_name", str(demo_dir / "tokenizer")]
    if not (reuse and (model_dir / "train_results.json").is_file()):
        demo.run(cmd + variant_flags(name), env)
    scored = all((eval_root / split / "metrics.json").is_file() for split in ("test", "test_novel"))
    run = demo.run
    if reuse and scored:
        demo.run = lambda *a, **k: None  # the scores on disk are this model's: read them, do not recompute
    try:
        splits, _ = demo.evaluate_splits(model_dir, demo_dir / "data", eval_root, cfg, False, env)
    finally:
        demo.run = run
    results = json.loads((model_dir / "train_results.json").read_text())
    return {
        "variant": name,
        "flags": variant_flags(name),
        "trainable_parameters": results["trainable_parameters"],
        "train_seconds": results["train_seconds"],
        "final_train_loss": results["final_train_loss"],
        "splits": splits,
    }


def from_demo_report(demo_dir: Path) -> dict[str, Any]:
    """The full fine-tuning row from the demo's own run (``report/metrics.json``)."""
    metrics = json.loads((demo_dir / "report" / "metrics.json").read_text())
    training = metrics["training"]
    return {
        "variant": "full",
        "flags": [],
        "trainable_parameters": training["trainable_parameters"],
        "train_seconds": metrics["timings_seconds"].get("clipcap_training"),
        "final_train_loss": training["final_train_loss"],
        "splits": metrics["splits"],
        "from": str(demo_dir / "report" / "metrics.json"),
    }


def render_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of docs/demo.md."""
    lines = [
        "| LM training | trainable params | test CIDEr-D | test exact (1 obj / 2 obj) | test_novel CIDEr-D "
        "| test_novel exact | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        test, novel = row["splits"]["test"], row["splits"]["test_novel"]
        em = test["exact_match"]
        lines.append(
            f"| {row['variant']} | {row['trainable_parameters']:,} | {test['metrics']['CIDEr']:.3f} | "
            f"{em['all']['rate']:.3f} ({em['1']['rate']:.3f} / {em['2']['rate']:.3f}) | "
            f"{novel['metrics']['CIDEr']:.3f} | {novel['exact_match']['all']['rate']:.3f} | {row['train_seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo_dir", required=True, help="A finished demo's output folder (training/demo.py).")
    p.add_argument("--output_dir", default="adapter_quality_runs")
    p.add_argument("--variants", nargs="+", default=["frozen", "lora_r4", "lora_r32", "full"])
    p.add_argument("--train_steps", type=int, help="Default: the demo's.")
    p.add_argument("--threads", type=int, default=1)
    add_bool_argument(p, "reuse_full", help="Take the full fine-tuning row from the demo's report.")
    add_bool_argument(p, "reuse_runs", help="Keep finished variants under --output_dir (model and scores).")
    p.add_argument("--results", default=str(BENCH_DIR / "results" / "adapter_quality.json"))
    args = p.parse_args(argv)

    demo_dir, out = Path(args.demo_dir).resolve(), Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo.resolve(argparse.Namespace(quick=False), demo.load_settings(demo.PRESET))
    if args.train_steps:
        cfg["train_steps"] = args.train_steps
    env = demo.stage_env(out, args.threads)
    rows = []
    for name in args.variants:
        if name == "full" and args.reuse_full:
            rows.append(from_demo_report(demo_dir))
        else:
            rows.append(run_variant(name, demo_dir, out, cfg, env, args.reuse_runs))
        print(render_table(rows), flush=True)
    record = {"settings": cfg, "demo_dir": str(demo_dir), "threads": args.threads, "rows": rows}
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
