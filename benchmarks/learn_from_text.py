"""Learning from text on the synthetic shapes (issue 25): baseline / + LM text / + retrieval / text-only /
text-only + retrieval, and the datastore swap.

Reuses a demo output folder (``python training/demo.py --output_dir DEMO``: its data with ``data/corpus/``,
tokenizer, ``clip/`` towers written with their text side, random ``gpt2/``) and runs each variant with the demo's
own commands (``training/pretrain_lm.py``, ``clipcap index``, ``training/train.py`` with the preset's training
arguments and the demo's ``train_steps``, ``clipcap evaluate`` on test and test_novel, greedy, METEOR off):

    python benchmarks/learn_from_text.py --demo_dir DEMO --work_dir WORK --variants lm retrieval text_only
    python benchmarks/learn_from_text.py --demo_dir DEMO --work_dir WORK --swap retrieval   # the datastore swap
    python benchmarks/learn_from_text.py --work_dir WORK --report

Variants (cumulative where it makes sense): ``lm``: the GPT-2 first reads ``data/corpus/captions.txt``
(``--lm_steps``); ``retrieval``: that LM + ``--retrieval_k`` captions retrieved from ``corpus/datastore.txt``;
``text_only``: that LM, ClipCap trained from ``corpus/captions.txt`` alone (noise estimated on the validation
pairs); ``text_only_retrieval``: both; ``pairs_text``: that LM, ClipCap trained on the pairs and on
``corpus/captions.txt`` as text rows (``--text_file``); ``pairs_text_retrieval``: with retrieval. ``--tag T``
names a run ``<variant>_T`` and ``--train_args "..."`` adds training flags (e.g. ``--modality_shift``). The swap (``--swap VARIANT``) writes ``test`` with references in the
generator's second phrasing style (``synthetic_data.make_captions_style2``, which no training data uses), indexes
``corpus/datastore_style2.txt``, and evaluates the retrieval model against those references with the first
datastore and then with the second, without retraining. Each run writes ``WORK/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "training"))
sys.path.insert(0, str(REPO_ROOT))

import demo  # noqa: E402
import synthetic_data  # noqa: E402

VARIANTS = ("lm", "retrieval", "text_only", "text_only_retrieval", "pairs_text", "pairs_text_retrieval")


def lm_dir(demo_dir: Path, work: Path, steps: int, positions: int, env: dict[str, str]) -> Path:
    """The demo's random GPT-2 with room for a retrieval prompt, after ``steps`` of reading the corpus."""
    from transformers import AutoTokenizer

    out = work / f"gpt2_read_{steps}"
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    config = demo.read_preset(demo.PRESET)["config"]["text_config"]
    demo.write_random_gpt2(config, tokenizer, work / "gpt2", 0, positions)
    if steps == 0:  # --lm_steps 0: the random GPT-2 as it is
        return work / "gpt2"
    demo.run([sys.executable, str(REPO_ROOT / "training" / "pretrain_lm.py"), "--model_name_or_path",
              str(work / "gpt2"), "--train_file", str(demo_dir / "data" / "corpus" / "captions.txt"),
              "--output_dir", str(out), "--max_steps", str(steps), "--no_progress"], env)  # fmt: skip
    return out


def datastore(demo_dir: Path, work: Path, corpus: str, env: dict[str, str]) -> Path:
    """A datastore of ``data/corpus/<corpus>``, or with ``corpus="train"`` of the training images' own captions
    (keyed by image: retrieval training leaves each image's own captions out, as SmallCap does)."""
    source = demo_dir / "data" / ("train/metadata.jsonl" if corpus == "train" else f"corpus/{corpus}")
    out = work / f"datastore_{Path(corpus).stem}"
    if not (out / "datastore.json").is_file():
        demo.run([sys.executable, "-m", "modeling_clipcap.cli", "index", "--model", str(demo_dir / "clip"),
                  "--data", str(source), "--output_dir", str(out), "--no_progress"], env)  # fmt: skip
    return out


def run_variant(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    demo_dir, work = Path(args.demo_dir), Path(args.work_dir)
    data = demo_dir / "data"
    text_model = lm_dir(demo_dir, work, args.lm_steps, 128, env)
    run_name = f"{name}_{args.tag}" if args.tag else name
    model_dir = work / f"model_{run_name}"
    cmd = demo.train_command(
        data, model_dir, work / "embedding_cache", {"train_steps": args.train_steps, "seed": 0}
    )
    cmd += ["--config", str(demo.PRESET), "--vision_model_name_or_path", str(demo_dir / "clip"),
            "--text_model_name_or_path", str(text_model), "--tokenizer_name", str(demo_dir / "tokenizer"),
            "--no_eval_meteor"]  # fmt: skip
    store = train_store = None
    if "retrieval" in name:
        store = datastore(demo_dir, work, "datastore.txt", env)  # what the model captions with
        train_store = datastore(demo_dir, work, args.train_datastore, env)
    recipe = {
        "retrieval_k": args.retrieval_k,
        "retrieval_template": args.retrieval_template,
        "text_only": name.startswith("text_only"),
        "corpus_text": name.startswith("pairs_text"),
    }
    cmd += demo.text_training_flags(data, demo_dir, recipe, train_store)  # the demo's own flags
    cmd += args.train_args.split()
    start = time.time()
    if not (model_dir / "config.json").is_file():
        demo.run(cmd, env)
    train_seconds = round(time.time() - start, 1)
    cfg = {"num_beams": 1}
    splits, _ = demo.evaluate_splits(model_dir, data, work / f"evaluate_{run_name}", cfg, False, env, store)
    result = {
        "variant": run_name,
        "train_args": args.train_args,
        "train_seconds": train_seconds,
        "splits": splits,
        "load_average": os.getloadavg(),
    }
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{run_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def write_style2_split(data: Path, work: Path, split: str = "test") -> Path:
    """``split`` with its references rewritten in the second phrasing style (same images)."""
    out = work / f"{split}_style2"
    out.mkdir(parents=True, exist_ok=True)
    rows = demo.read_captions(data / split / "metadata.jsonl")
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            row["captions"] = synthetic_data.make_captions_style2(row["objects"], row["relation"])
            f.write(json.dumps(row) + "\n")
    return out


def run_swap(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    demo_dir, work = Path(args.demo_dir), Path(args.work_dir)
    model_dir = work / f"model_{name}"
    split_dir = write_style2_split(demo_dir / "data", work)
    result: dict[str, Any] = {"variant": name}
    for corpus in ("datastore.txt", "datastore_style2.txt"):
        store = datastore(demo_dir, work, corpus, env)
        eval_dir = work / f"swap_{name}_{Path(corpus).stem}"
        demo.run([sys.executable, "-m", "modeling_clipcap.cli", "evaluate", "--model", str(model_dir), "--data",
                  str(split_dir / "metadata.jsonl"), "--split", "test", "--image_dir", str(demo_dir / "data" / "test"), "--output_dir", str(eval_dir),
                  "--batch_size", "64", "--num_beams", "1", "--no_meteor", "--datastore", str(store),
                  "--no_progress"], env)  # fmt: skip
        scores = json.loads((eval_dir / "metrics.json").read_text())
        rows = demo.read_captions(split_dir / "metadata.jsonl")
        preds = {Path(str(k)).name: v for k, v in demo.prediction_map(eval_dir / "predictions.json").items()}
        result[Path(corpus).stem] = {
            "CIDEr": scores["CIDEr"],
            "exact_match": demo.exact_match_rates(preds, rows, key=lambda r: Path(r["file_name"]).name),
            "example": next(iter(preds.values())),
        }
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / f"swap_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(work: Path) -> None:
    for path in sorted((work / "results").glob("*.json")):
        r = json.loads(path.read_text())
        if "splits" in r:
            cells = []
            for split in ("test", "test_novel"):
                entry = r["splits"][split]
                em = entry["exact_match"]
                cells.append(
                    f"{entry['metrics'].get('CIDEr', float('nan')):.2f} / {em['all']['rate']:.3f} "
                    f"({em['1']['rate']:.3f} / {em['2']['rate']:.3f})"
                )
            print(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['train_seconds']} s |")
        else:
            print(f"swap {r['variant']}: " + json.dumps({k: v for k, v in r.items() if k != "variant"}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo_dir", help="a demo output folder (data, tokenizer, clip with its text tower)")
    p.add_argument("--work_dir", required=True)
    p.add_argument("--variants", nargs="*", default=[], choices=VARIANTS)
    p.add_argument(
        "--swap", nargs="*", default=[], help="variants whose model is evaluated with both datastores"
    )
    p.add_argument("--lm_steps", type=int, default=300)
    p.add_argument("--train_steps", type=int, default=1200)
    p.add_argument("--retrieval_k", type=int, default=2)
    p.add_argument("--retrieval_template", default="{captions}")
    p.add_argument(
        "--train_datastore",
        default="datastore.txt",
        help="what retrieval variants retrieve from in training: a corpus file, or 'train' (the training images' "
        "own captions, each image's left out); evaluation always retrieves from corpus/datastore.txt",
    )
    p.add_argument("--tag", default="", help="run name suffix (model_<variant>_<tag>)")
    p.add_argument("--train_args", default="", help="extra training/train.py flags, e.g. --modality_shift")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    env = demo.stage_env(Path(args.work_dir), 1)
    for name in args.variants:
        run_variant(name, args, env)
    for name in args.swap:
        run_swap(name, args, env)
    report(Path(args.work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
