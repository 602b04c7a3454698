"""Who is where, measured: tower pretraining and ClipCap training variants on the demo's data (issue 26).

Each variant re-runs the demo's stages 3-5 on an existing demo output folder (its ``data/``, ``tokenizer/`` and
``gpt2/``: ``python training/demo.py --output_dir OUT`` first): ``training/pretrain_clip.py`` with the variant's
flags (hard negatives, flips, ...) and ``--eval_file`` on the test split (the ARO-style swap scores), then
``training/train.py`` with the variant's flags on that tower, then ``clipcap evaluate`` on test and test_novel
(CIDEr-D; exact match by object count, as the demo reports). The towers' two-object probes come from
``benchmarks/tower_probe.py``.

    python benchmarks/binding_grid.py --demo_dir demo_output --output_dir /tmp/binding \\
        --variant base \\
        --variant 'negatives:--hard_negatives swap_attributes swap_objects swap_relation' \\
        --variant 'tokens:|--mapping_input tokens'

A variant is ``NAME[:PRETRAIN FLAGS[|TRAIN FLAGS]]``. ``--pretrain_only`` stops after the towers (their swap
scores and probes: about half a minute each). Prints a table and writes ``benchmarks/results/binding_grid.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, print_table, write_json  # noqa: E402
from tower_probe import probe_tower  # noqa: E402


def _demo_module() -> Any:
    spec = importlib.util.spec_from_file_location("clipcap_demo", REPO_ROOT / "training" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str) -> tuple[str, list[str], list[str]]:
    """``NAME[:PRETRAIN FLAGS[|TRAIN FLAGS]]`` -> (name, pretrain flags, train flags)."""
    name, _, flags = text.partition(":")
    pretrain, _, train = flags.partition("|")
    return name.strip(), shlex.split(pretrain), shlex.split(train)


def run_variant(
    demo: Any,
    demo_dir: Path,
    out: Path,
    name: str,
    pretrain: list[str],
    train: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    data = demo_dir / "data"
    env = demo.stage_env(out, args.threads)
    record: dict[str, Any] = {
        "variant": name,
        "pretrain flags": " ".join(pretrain),
        "train flags": " ".join(train),
    }
    start = time.time()
    clip = out / "clip"
    if not (clip / "pretrain_results.json").is_file():
        demo.run(
            [sys.executable, str(REPO_ROOT / "training" / "pretrain_clip.py")]
            + ["--train_file", str(data / "train" / "metadata.jsonl"), "--config", str(args.config)]
            + ["--tokenizer_name", str(demo_dir / "tokenizer"), "--output_dir", str(clip)]
            + ["--max_steps", str(args.clip_steps), "--seed", str(args.seed), "--no_progress"]
            + ["--eval_file", str(data / "test" / "metadata.jsonl")]
            + pretrain,
            env,
        )
    pretraining = json.loads((clip / "pretrain_results.json").read_text())
    record["pretrain seconds"] = pretraining["seconds"]
    for key in ("aro", "swap_attributes", "swap_objects", "swap_relation"):
        record[key] = (pretraining.get("binding") or {}).get(key)
    probed = probe_tower(clip, data, args.probe_images, 256)
    record.update({k: probed.get(k) for k in ("where test", "binding test", "shape novel", "color novel")})
    if args.pretrain_only:
        return record
    model = out / "model"
    if not (model / "config.json").is_file():
        cfg = {"train_steps": args.train_steps, "seed": args.seed}
        demo.run(
            demo.train_command(data, model, out / "embedding_cache", cfg)
            + ["--config", str(args.config), "--vision_model_name_or_path", str(clip)]
            + [
                "--text_model_name_or_path",
                str(demo_dir / "gpt2"),
                "--tokenizer_name",
                str(demo_dir / "tokenizer"),
            ]
            + train,
            env,
        )
    splits, _ = demo.evaluate_splits(model, data, out / "evaluate", {"num_beams": 1}, False, env)
    for split, entry in splits.items():
        record[f"{split} CIDEr-D"] = round(entry["metrics"]["CIDEr"], 3)
        for group in ("1", "2"):
            rate = entry["exact_match"][group]["rate"]
            record[f"{split} exact {group}obj"] = None if rate is None else round(rate, 3)
    record["seconds"] = round(time.time() - start, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--demo_dir", type=Path, required=True, help="a demo output folder (data/, tokenizer/, gpt2/)"
    )
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--variant", action="append", required=True, help="NAME[:PRETRAIN FLAGS[|TRAIN FLAGS]]")
    p.add_argument("--config", default=str(REPO_ROOT / "hub_configs" / "clipcap-synthetic-tiny"))
    p.add_argument("--clip_steps", type=int, default=240)
    p.add_argument("--train_steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe_images", type=int, default=4000)
    p.add_argument("--pretrain_only", action="store_true", help="towers, swap scores and probes only")
    args = p.parse_args(argv)
    for path in ("data", "tokenizer", "gpt2"):
        if not (args.demo_dir / path).exists():
            raise SystemExit(
                f"{args.demo_dir / path} does not exist: run training/demo.py --output_dir first."
            )
    demo = _demo_module()
    records = []
    for text in args.variant:
        name, pretrain, train = parse_variant(text)
        records.append(run_variant(demo, args.demo_dir, args.output_dir / name, name, pretrain, train, args))
        print(json.dumps(records[-1]), flush=True)
    columns = [
        "variant",
        "aro",
        "swap_attributes",
        "swap_objects",
        "swap_relation",
        "where test",
        "binding test",
    ]
    if not args.pretrain_only:
        columns += ["test CIDEr-D", "test exact 1obj", "test exact 2obj", "test_novel CIDEr-D"]
        columns += ["test_novel exact 1obj", "test_novel exact 2obj"]
    print_table(
        records, columns, title="Binding: towers (swap scores, probes) and captioners on the demo's data"
    )
    write_json("binding_grid", {"demo_dir": str(args.demo_dir), "variants": records}, RESULTS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
