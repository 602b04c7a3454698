"""Which image tower, pretraining objective and mapper input caption the synthetic shapes best (issue 16, point 6).

The grid: tower (``clip_vit``: the demo's tiny CLIP ViT; ``resnet``: a 0.3M-parameter 3-stage ResNet;
``dinov2``: a DINOv2 ViT of the CLIP ViT's size) x contrastive pretraining objective (``clip``, ``filip``,
``training/pretrain_clip.py``) x mapper input (``pooled``: the demo's MLP mapper on the pooled embedding;
``tokens``: a 2-layer transformer mapper over the tower's token features). Each tower x objective is
pretrained once (the budget below) and reused
for both mapper inputs; ClipCap then trains for the demo's ``train_steps`` steps (steps are counted, not wall
time) and is evaluated on ``test`` and ``test_novel`` exactly as the demo does. Everything else is the demo:
its data set, tokenizer, random tiny GPT-2, ``training/train.py`` with the preset's training arguments, and
``clipcap evaluate`` (through ``training/demo.py``'s functions; METEOR off to save time).

    python benchmarks/synthetic_towers.py --clip_batch_size 128 --clip_steps 120   # the grid as docs/demo.md shows it
    python benchmarks/synthetic_towers.py --variants resnet/clip/pooled resnet/clip/tokens   # the demo's budget
    python benchmarks/synthetic_towers.py --report                  # table + JSON from what has run

The pretraining budget (batch size x steps) is the demo's (``clip_pretraining.json``'s batch, ``demo.json``'s
``clip_steps``: 240 steps of batch 64 since the grid) unless ``--clip_batch_size`` / ``--clip_steps`` change it;
everything else (warm-up, learning rate) is ``clip_pretraining.json``'s. The budget is part of every tower's and result's name
(``b128x120``), so runs under different budgets sit side by side: each variant writes
``WORK/results/<tower>_<objective>_<input>_<budget>.json`` (several invocations can run at once), and ``--report``
(also run after every invocation) collects them into ``benchmarks/results/synthetic_towers.json`` and prints the
table. Wall times are recorded with the load average at the start and end of each stage, because the machine is
shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "training"))
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402  (training/demo.py: its stages are reused, not copied)
from common import RESULTS_DIR, print_table, write_json  # noqa: E402

from modeling_clipcap.presets import read_preset  # noqa: E402

#: the towers (``None``: the preset's config.json vision_config, the demo's tiny CLIP ViT)
TOWERS: dict[str, dict[str, Any] | None] = {
    "clip_vit": None,
    "resnet": {
        "model_type": "resnet",
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128],
        "depths": [1, 1, 1],
        "layer_type": "basic",
    },
    "dinov2": {
        "model_type": "dinov2",
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
    },
}
OBJECTIVES = ("clip", "filip")
#: the pretraining budget the whole grid ran under (the demo's until the grid chose batch 64 x 240 steps)
DEMO_BUDGET_BEFORE_GRID = "b128x120"
#: what the mapper reads: the demo's MLP mapper, or a small transformer mapper over the token features
MAPPER_INPUTS: dict[str, dict[str, Any]] = {
    "pooled": {"mapping_input": "pooled", "mapping_type": "mlp"},
    "tokens": {
        "mapping_input": "tokens",
        "mapping_type": "transformer",
        "mapping_num_layers": 2,
        "mapping_num_heads": 4,
    },
}
#: the whole grid, most informative first (the prototype's winner, CNN + CLIP loss + pooled, leads)
PRIORITY = [
    "resnet/clip/pooled",
    "resnet/clip/tokens",
    "resnet/filip/tokens",
    "clip_vit/clip/pooled",
    "clip_vit/clip/tokens",
    "resnet/filip/pooled",
    "dinov2/clip/pooled",
    "dinov2/clip/tokens",
    "clip_vit/filip/tokens",
    "dinov2/filip/tokens",
    "clip_vit/filip/pooled",
    "dinov2/filip/pooled",
]
COLUMNS = [
    "variant",
    "test CIDEr-D",
    "test exact",
    "1 obj",
    "2 obj",
    "novel CIDEr-D",
    "novel exact",
    "pretrain s",
    "ClipCap s",
    "load avg",
]


def parse_variant(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if (
        len(parts) != 3
        or parts[0] not in TOWERS
        or parts[1] not in OBJECTIVES
        or parts[2] not in MAPPER_INPUTS
    ):
        raise SystemExit(
            f"--variants {text!r}: expected TOWER/OBJECTIVE/INPUT with TOWER in {sorted(TOWERS)}, "
            f"OBJECTIVE in {OBJECTIVES}, INPUT in {sorted(MAPPER_INPUTS)}."
        )
    return parts[0], parts[1], parts[2]


def budget_name(cfg: dict[str, Any]) -> str:
    """The pretraining budget as it appears in names and the table: ``b<batch>x<steps>``."""
    return f"b{cfg['clip_batch_size']}x{cfg['clip_steps']}"


def record_budget(record: dict[str, Any]) -> str:
    """A result's budget (records written before budgets were named: from its pretraining summary)."""
    if "budget" in record:
        return record["budget"]
    return f"b{record['pretraining']['batch_size']}x{record['pretraining']['steps']}"


def stage_env(threads: int) -> dict[str, str]:
    """The demo's subprocess environment (offline, one torch thread per process)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` and record its wall time with the 1-minute load average before and after."""
    load_before, t0 = os.getloadavg()[0], time.time()
    result = fn(*args, **kwargs)
    return result, {
        "seconds": round(time.time() - t0, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def prepare(work: Path, cfg: dict[str, Any]) -> tuple[Path, Any]:
    """The demo's data set, tokenizer and random tiny GPT-2 under ``work`` (reused when already there)."""
    sizes = {s: int(cfg[f"{s}_size"]) for s in ("train", "validation", "test", "test_novel")}
    data_dir = demo.make_data(work / "data", sizes, int(cfg["seed"]))
    model_config = json.loads((demo.PRESET / "config.json").read_text())
    if not (work / "gpt2" / "config.json").is_file():
        rows = demo.read_captions(data_dir / "train" / "metadata.jsonl")
        tokenizer = demo.train_tokenizer(
            [c for row in rows for c in row["captions"]], work / "tokenizer", int(cfg["tokenizer_vocab_size"])
        )
        demo.write_random_gpt2(model_config["text_config"], tokenizer, work / "gpt2", int(cfg["seed"]))
    return data_dir, model_config


def pretrain(
    work: Path, data_dir: Path, tower: str, objective: str, cfg: dict[str, Any], env: dict[str, str]
) -> Path:
    """``training/pretrain_clip.py`` for one tower x objective (skipped when its output is already there)."""
    out = work / "towers" / f"{tower}_{objective}_{budget_name(cfg)}"
    if (out / "pretrain_results.json").is_file():
        return out
    cmd = [
        sys.executable,
        str(demo.TRAINING_DIR / "pretrain_clip.py"),
        "--train_file",
        str(data_dir / "train" / "metadata.jsonl"),
        "--config",
        str(demo.PRESET),
        "--tokenizer_name",
        str(work / "tokenizer"),
        "--output_dir",
        str(out),
        "--objective",
        objective,
        "--max_steps",
        str(cfg["clip_steps"]),
        "--seed",
        str(cfg["seed"]),
        "--batch_size",
        str(cfg["clip_batch_size"]),
        "--no_progress",
    ]
    # always explicit: the preset's clip_pretraining.json may name another tower than config.json's CLIP ViT
    vision = TOWERS[tower] or json.loads((demo.PRESET / "config.json").read_text())["vision_config"]
    (work / "towers").mkdir(parents=True, exist_ok=True)
    vision_json = work / "towers" / f"{tower}.json"
    vision_json.write_text(json.dumps(vision, indent=2))
    cmd += ["--vision_config", str(vision_json)]
    demo.run(cmd, env)
    return out


def train_clipcap(
    work: Path,
    data_dir: Path,
    tower_dir: Path,
    name: str,
    mapper_input: str,
    cfg: dict[str, Any],
    env: dict[str, str],
) -> Path:
    """``training/train.py`` on the frozen tower, with a copy of the demo preset whose config selects the mapper
    (the embedding cache holds what the mapper reads: pooled embeddings or token features)."""
    preset = work / "presets" / name
    shutil.copytree(demo.PRESET, preset, dirs_exist_ok=True)
    config = json.loads((preset / "config.json").read_text())
    config.update(MAPPER_INPUTS[mapper_input])
    (preset / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model_dir = work / "models" / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    cmd = [
        sys.executable,
        str(demo.TRAINING_DIR / "train.py"),
        "--config",
        str(preset),
        "--train_file",
        str(data_dir / "train" / "metadata.jsonl"),
        "--validation_file",
        str(data_dir / "validation" / "metadata.jsonl"),
        "--output_dir",
        str(model_dir),
        "--max_train_steps",
        str(cfg["train_steps"]),
        "--seed",
        str(cfg["seed"]),
        "--vision_model_name_or_path",
        str(tower_dir),
        "--text_model_name_or_path",
        str(work / "gpt2"),
        "--tokenizer_name",
        str(work / "tokenizer"),
        "--embedding_cache_dir",
        str(work / "embedding_cache" / name),
    ]
    demo.run(cmd, env)
    return model_dir


def run_variant(work: Path, variant: str, cfg: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Pretrain (or reuse) the tower, train ClipCap, evaluate both splits; the record is written to WORK/results."""
    tower, objective, mapper_input = parse_variant(variant)
    name = f"{variant.replace('/', '_')}_{budget_name(cfg)}"
    data_dir, _ = prepare(work, cfg)
    tower_dir, pretrain_time = timed(pretrain, work, data_dir, tower, objective, cfg, env)
    model_dir, train_time = timed(train_clipcap, work, data_dir, tower_dir, name, mapper_input, cfg, env)
    (splits, _), eval_time = timed(
        demo.evaluate_splits, model_dir, data_dir, work / "evaluate" / name, cfg, True, env
    )
    record = {
        "variant": variant,
        "tower": tower,
        "objective": objective,
        "mapper_input": mapper_input,
        "mapper": MAPPER_INPUTS[mapper_input],
        "clip_steps": cfg["clip_steps"],
        "clip_batch_size": cfg["clip_batch_size"],
        "budget": budget_name(cfg),
        "train_steps": cfg["train_steps"],
        "pretraining": json.loads((tower_dir / "pretrain_results.json").read_text()),
        "pretraining_stage": pretrain_time,
        "clipcap_training": train_time,
        "evaluation": eval_time,
        "splits": splits,
    }
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def table_row(record: dict[str, Any]) -> dict[str, Any]:
    test, novel = record["splits"]["test"], record["splits"]["test_novel"]
    loads = record["pretraining_stage"]["load_average"] + record["clipcap_training"]["load_average"]
    return {
        "variant": f"{record['variant']} {record_budget(record)}",
        "test CIDEr-D": test["metrics"].get("CIDEr"),
        "test exact": test["exact_match"]["all"]["rate"],
        "1 obj": test["exact_match"].get("1", {}).get("rate"),
        "2 obj": test["exact_match"].get("2", {}).get("rate"),
        "novel CIDEr-D": novel["metrics"].get("CIDEr"),
        "novel exact": novel["exact_match"]["all"]["rate"],
        "pretrain s": record["pretraining"]["seconds"],
        "ClipCap s": record["clipcap_training"]["seconds"],
        "load avg": f"{min(loads):.1f}-{max(loads):.1f}",
    }


def report(work: Path) -> Path | None:
    """Print the table of every finished variant and write ``benchmarks/results/synthetic_towers.json``."""
    records = [json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))]
    if not records:
        print(f"no finished variants under {work / 'results'}")
        return None
    order = {v: i for i, v in enumerate(PRIORITY)}
    records.sort(
        key=lambda r: (record_budget(r) != DEMO_BUDGET_BEFORE_GRID, order.get(r["variant"], len(order)))
    )
    print_table(
        [table_row(r) for r in records], COLUMNS, title="Synthetic shapes: tower x objective x mapper input"
    )
    not_run = [
        v
        for v in PRIORITY
        if v not in {r["variant"] for r in records if record_budget(r) == DEMO_BUDGET_BEFORE_GRID}
    ]
    return write_json(
        "synthetic_towers", {"variants": records, "not_run": not_run, "work_dir": str(work)}, RESULTS_DIR
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work_dir", default="/tmp/clipcap-synthetic-towers", help="data, towers, models, results"
    )
    p.add_argument(
        "--variants", nargs="*", default=None, help="TOWER/OBJECTIVE/INPUT (default: the whole grid)"
    )
    p.add_argument(
        "--clip_batch_size", type=int, default=None, help="pretraining batch (default: the preset's)"
    )
    p.add_argument("--clip_steps", type=int, default=None, help="pretraining steps (default: the demo's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (the demo's default 1)")
    p.add_argument("--report", action="store_true", help="only collect finished variants into the table")
    args = p.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if not args.report:
        cfg = demo.resolve(demo.build_parser().parse_args([]), demo.load_settings(demo.PRESET))
        cfg["clip_steps"] = args.clip_steps or cfg["clip_steps"]
        cfg["clip_batch_size"] = (
            args.clip_batch_size or read_preset(demo.PRESET)["clip_pretraining"]["batch_size"]
        )
        env = stage_env(args.threads)
        for variant in args.variants or PRIORITY:
            demo.log(f"variant {variant}")
            run_variant(work, variant, cfg, env)
    report(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
