#!/usr/bin/env python
"""The offline end-to-end demo: synthetic data -> (contrastive image tower) -> ClipCap training -> evaluation -> report.

    python training/demo.py --output_dir demo_output          # what `bash scripts/demo.sh` runs

Every stage is the command a user would run, started as a subprocess:

1. ``training/synthetic_data.py`` writes the synthetic shapes data set (train / validation / test /
   test_novel image folders with ``metadata.jsonl``) to ``OUT/data``.
2. A byte-level BPE tokenizer (GPT-2 style: ``<|endoftext|>`` is bos = eos, "." is id 13) is trained on
   the training captions with the ``tokenizers`` library -> ``OUT/tokenizer``.
3. Recipe ``clip`` (the default, see docs/demo.md for why): ``training/pretrain_clip.py`` trains the
   preset's image tower (``clip_pretraining.json``: a small ResNet) contrastively with the CLIP loss ->
   ``OUT/clip``; a randomly initialised tiny GPT-2 is written to ``OUT/gpt2``; ``training/train.py`` then
   trains the mapping network and GPT-2 on the frozen tower's cached image embeddings. Recipes ``random`` (frozen random
   vision tower) and ``end2end`` (``freeze_vision=False``, the vision tower trained by the captioning loss)
   are the alternatives measured in docs/demo.md.
4. ``clipcap evaluate`` on ``test`` and ``test_novel`` (BLEU, METEOR, ROUGE-L, CIDEr-D with pycocoevalcap).
5. ``clipcap caption`` on sample test images.
6. ``OUT/report/``: ``report.md``, ``metrics.json`` (both splits, exact-match rates by object count) and
   ``samples.png`` (sample images with predicted and reference captions).

Settings come from ``hub_configs/clipcap-synthetic-tiny`` (``config.json``, ``training_args.json``,
``clip_pretraining.json``, ``demo.json``); flags override them (``--quick`` shrinks everything for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from modeling_clipcap.caption_metrics import exact_match_text
from modeling_clipcap.cli import add_bool_argument, add_renamed_argument
from modeling_clipcap.presets import find_preset, read_preset

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = REPO_ROOT / "hub_configs" / "clipcap-synthetic-tiny"
TRAINING_DIR = REPO_ROOT / "training"

#: shrunken settings for the end-to-end test (`--quick`)
QUICK: dict[str, Any] = {
    "train_size": 600,
    "validation_size": 20,
    "test_size": 60,
    "test_novel_size": 30,
    "clip_steps": 30,  # batch 64: the images 15 steps of the former batch 128 saw
    "train_steps": 100,  # the text rows outnumber the 600 images' captions here: 40 steps learnt too little
    "num_samples": 6,
    "lm_steps": 30,
}


def log(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run a stage as a subprocess (its progress bars go straight to the terminal); stop on failure."""
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: the command above failed with exit status {result.returncode}.")


def load_settings(preset: Path) -> dict[str, Any]:
    """The demo's defaults from the preset's ``demo.json`` (read by ``modeling_clipcap.presets``)."""
    settings = dict(read_preset(preset).get("demo", {}))
    settings.pop("_comment", None)
    return settings


# ------------------------------------------------------------------------------------------------ stages


def make_data(out: Path, sizes: dict[str, int], seed: int) -> Path:
    """Generate the synthetic data set with its CLI, unless ``out`` already holds the same one."""
    info_path = out / "synthetic_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("seed") == seed and info.get("sizes") == sizes:
            print(f"reusing the data set in {out} (same seed and sizes)")
            if not (out / "corpus" / "captions.txt").is_file():  # written before the generator wrote a corpus
                sys.path.insert(0, str(TRAINING_DIR))
                from synthetic_data import write_text_corpus

                write_text_corpus(out / "corpus")
            return out
    cmd = [
        sys.executable,
        str(TRAINING_DIR / "synthetic_data.py"),
        "--output_dir",
        str(out),
        "--seed",
        str(seed),
    ]
    for split, n in sizes.items():
        cmd += [f"--{split}_size", str(n)]
    run(cmd)
    return out


def read_captions(metadata: Path) -> list[dict[str, Any]]:
    with open(metadata, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_tokenizer(captions: list[str], out: Path, vocab_size: int) -> Any:
    """A GPT-2 style byte-level BPE trained on ``captions``: "." -> 13, ``<|endoftext|>`` = bos = eos = unk."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        bpe.save(path)
        tokenizer = GPT2TokenizerFast(tokenizer_file=path)
    tokenizer.add_special_tokens(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    )
    if tokenizer.convert_tokens_to_ids(".") != 13:
        raise RuntimeError("the caption tokenizer must map '.' to 13 like GPT-2")
    tokenizer.save_pretrained(out)
    return tokenizer


def write_random_gpt2(
    text_config: dict[str, Any], tokenizer: Any, out: Path, seed: int, n_positions: int | None = None
) -> None:
    """A randomly initialised tiny GPT-2 (the preset's ``text_config``; ``n_positions`` if given: room for a
    retrieval prompt) with the demo tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = {k: v for k, v in text_config.items() if k not in ("model_type", "transformers_version")}
    if n_positions:
        fields["n_positions"] = n_positions
    fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if len(tokenizer) > fields.get("vocab_size", 0):
        fields["vocab_size"] = len(tokenizer)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**fields)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def exact_match_rates(predictions: dict[str, str], rows: list[dict[str, Any]], key) -> dict[str, Any]:
    """Exact-match rate (prediction equals one of the references, ignoring case and the final ".")
    overall and by number of objects."""
    hits: dict[str, list[int]] = {"all": [], "1": [], "2": []}
    for row in rows:
        prediction = predictions.get(key(row))
        if prediction is None:
            continue
        ok = int(exact_match_text(prediction) in {exact_match_text(c) for c in row["captions"]})
        hits["all"].append(ok)
        hits.setdefault(str(row["num_objects"]), []).append(ok)
    return {group: {"rate": (sum(v) / len(v)) if v else None, "count": len(v)} for group, v in hits.items()}


def prediction_map(predictions_path: Path) -> dict[str, str]:
    items = json.loads(predictions_path.read_text())
    return {str(p["image_id"]): p["caption"] for p in items}


def match_key(predictions: dict[str, str], rows: list[dict[str, Any]], split_dir: Path):
    """How prediction ids name the rows of a split (file name, relative or absolute path)."""
    candidates = [
        lambda row: row["file_name"],
        lambda row: Path(row["file_name"]).stem,
        lambda row: str(split_dir / row["file_name"]),
        lambda row: f"{split_dir.name}/{row['file_name']}",
        lambda row: str((split_dir / row["file_name"]).resolve()),
    ]
    for key in candidates:
        if rows and key(rows[0]) in predictions:
            return key
    raise RuntimeError(
        f"cannot match clipcap evaluate's image ids (e.g. {next(iter(predictions), None)!r}) to "
        f"{split_dir}/metadata.jsonl file names"
    )


def draw_grid(samples: list[dict[str, Any]], path: Path) -> None:
    """A PNG grid: each sample image with its predicted caption (green if exact, red if not) and a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = 4
    rows = (len(samples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * 4.3 + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples):
        with Image.open(sample["path"]) as image:
            ax.imshow(image.convert("RGB"), interpolation="nearest")
        colour = "darkgreen" if sample["exact"] else "firebrick"
        title = f"[{sample['split']}] pred: {sample['prediction']}"
        ax.set_title(_wrap(title), fontsize=8, color=colour, loc="left")
        ax.text(0, -0.04, _wrap("ref: " + sample["reference"]), fontsize=7, transform=ax.transAxes, va="top")
    fig.suptitle("ClipCap demo: predicted (green = exact match) and reference captions", fontsize=10)
    fig.subplots_adjust(
        left=0.02, right=0.98, top=1 - 0.9 / (rows * 4.3 + 0.6), bottom=0.04, hspace=0.5, wspace=0.1
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _wrap(text: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or " "


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the offline ClipCap demo end to end.")
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument(
        "--config", default=str(PRESET), help="a preset name or folder (default: clipcap-synthetic-tiny)"
    )
    p.add_argument(
        "--recipe",
        choices=("clip", "random", "end2end"),
        default=None,
        help="clip: pretrain a tiny CLIP then freeze it (default); random: frozen random vision tower; "
        "end2end: train the vision tower with the captioning loss",
    )
    p.add_argument("--train_size", type=int, default=None)
    p.add_argument("--validation_size", type=int, default=None)
    p.add_argument("--test_size", type=int, default=None)
    p.add_argument("--test_novel_size", type=int, default=None)
    p.add_argument("--clip_steps", type=int, default=None, help="CLIP pretraining steps")
    p.add_argument("--train_steps", type=int, default=None, help="ClipCap training steps")
    p.add_argument("--num_samples", type=int, default=None, help="images in the sample grid")
    p.add_argument("--num_beams", type=int, default=None, help="beams for evaluation and captions")
    p.add_argument("--seed", type=int, default=None)
    g = p.add_argument_group("learning from text (the generator's unpaired corpus, data/corpus/)")
    g.add_argument("--lm_steps", type=int, default=None, help="steps of LM training on the corpus (0: none)")
    g.add_argument("--retrieval_k", type=int, default=None, help="captions retrieved per image (0: none)")
    g.add_argument("--retrieval_template", default=None, help="the retrieval prompt ({captions})")
    g.add_argument("--datastore_file", default=None, help="corpus file indexed (default: datastore.txt)")
    add_bool_argument(
        g, "text_only", default=None, help="ClipCap from the corpus alone (default: demo.json's)"
    )
    add_bool_argument(
        g,
        "corpus_text",
        default=None,
        help="ClipCap learns the corpus as text rows alongside the pairs (train.py --text_file; default: demo.json's)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: on 2 shared vCPUs, 2 threads made the tiny models' "
        "training steps 3-4x slower)",
    )
    add_bool_argument(p, "quick", help="tiny sizes (about a minute) for tests")
    add_bool_argument(p, "eval_meteor", default=True, help="score METEOR in the evaluation (starts java)")
    add_renamed_argument(p, "--no_meteor", "--no_eval_meteor")  # the earlier spelling, kept working for now
    return p


def resolve(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    defaults = {
        "recipe": "clip",
        "train_size": 20000,
        "validation_size": 200,
        "test_size": 1000,
        "test_novel_size": 500,
        "clip_steps": 240,
        "train_steps": 1200,
        "num_samples": 12,
        "num_beams": 1,
        "seed": 0,
        "tokenizer_vocab_size": 400,
        "lm_steps": 0,
        "retrieval_k": 0,
        "retrieval_template": "{captions}",
        "datastore_file": "datastore.txt",
        "text_only": False,
        "corpus_text": False,
    }
    defaults.update(settings)
    if args.quick:
        defaults.update(QUICK)
    return {
        k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in defaults.items()
    }


def pretrain_tiny_clip(
    data_dir: Path, preset: Path, out: Path, cfg: dict[str, Any], env: dict[str, str]
) -> None:
    """``training/pretrain_clip.py``: a tiny CLIP trained contrastively on the training captions -> ``out/clip``."""
    run(
        [
            sys.executable,
            str(TRAINING_DIR / "pretrain_clip.py"),
            "--train_file",
            str(data_dir / "train" / "metadata.jsonl"),
            "--config",
            str(preset),
            "--tokenizer_name",
            str(out / "tokenizer"),
            "--output_dir",
            str(out / "clip"),
            "--max_steps",
            str(cfg["clip_steps"]),
            "--seed",
            str(cfg["seed"]),
        ],
        env,
    )


def learn_from_text(
    data_dir: Path, out: Path, cfg: dict[str, Any], env: dict[str, str], stage_done: Any
) -> tuple[Path, Path | None]:
    """The unpaired corpus (``data/corpus/``) put to use: ``training/pretrain_lm.py`` lets the random GPT-2 read
    every phrasing of every scene (``lm_steps`` > 0) -> ``OUT/gpt2_read``; ``clipcap index`` embeds the datastore
    corpus with the pretrained towers' text tower (``retrieval_k`` > 0) -> ``OUT/datastore``. Returns the LM to
    train ClipCap from and the datastore (or None)."""
    text_model, datastore = out / "gpt2", None
    if int(cfg["lm_steps"]):
        log("3b/6 the language model reads the corpus (training/pretrain_lm.py)")
        t0 = time.time()
        run(
            [sys.executable, str(TRAINING_DIR / "pretrain_lm.py"), "--model_name_or_path", str(out / "gpt2"),
             "--train_file", str(data_dir / "corpus" / "captions.txt"), "--output_dir", str(out / "gpt2_read"),
             "--max_steps", str(cfg["lm_steps"]), "--seed", str(cfg["seed"])],
            env,
        )  # fmt: skip
        text_model = out / "gpt2_read"
        stage_done("lm_pretraining", t0)
    if int(cfg["retrieval_k"]):
        log("3c/6 caption datastore (clipcap index, the towers' text tower)")
        t0 = time.time()
        datastore = out / "datastore"
        run(
            [sys.executable, "-m", "modeling_clipcap.cli", "index", "--model", str(out / "clip"), "--data",
             str(data_dir / "corpus" / cfg["datastore_file"]), "--output_dir", str(datastore)],
            env,
        )  # fmt: skip
        stage_done("datastore", t0)
    return text_model, datastore


def text_training_flags(data_dir: Path, out: Path, cfg: dict[str, Any], datastore: Path | None) -> list[str]:
    """train.py's flags for retrieval (``--datastore``, ``--retrieval_k``, ``--retrieval_template``); with
    ``corpus_text``, the corpus as text rows next to the pairs (``--text_file``); for the ``text_only`` benchmark
    recipe, ``--text_only`` on the corpus (its ``--train_file`` comes last and wins). The text rows' noise is
    estimated on the validation pairs."""
    flags: list[str] = []
    if datastore is not None:
        flags += ["--datastore", str(datastore), "--retrieval_k", str(cfg["retrieval_k"])]
        flags += ["--retrieval_template", str(cfg["retrieval_template"])]
    if cfg["text_only"] or cfg["corpus_text"]:
        corpus = str(data_dir / "corpus" / "captions.txt")
        flags += [
            "--towers",
            str(out / "clip"),
            "--noise_sample_file",
            str(data_dir / "validation" / "metadata.jsonl"),
        ]
        flags += ["--text_only", "--train_file", corpus] if cfg["text_only"] else ["--text_file", corpus]
    return flags


def write_recipe_preset(
    preset: Path, train_preset: Path, recipe: str, model_config: dict[str, Any], tokenizer: Any
) -> Path:
    """A copy of the preset for the ``random`` / ``end2end`` recipes (no pretrained CLIP): the tokenizer's special
    ids in the GPT-2 config, and ``freeze_vision=False`` for end2end."""
    shutil.copytree(preset, train_preset, dirs_exist_ok=True)
    model_config["text_config"].update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if recipe == "end2end":
        model_config["freeze_vision"] = False
    (train_preset / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    return train_preset


def evaluate_splits(
    model_dir: Path,
    data_dir: Path,
    eval_root: Path,
    cfg: dict[str, Any],
    eval_meteor: bool,
    env: dict[str, str],
    datastore: Path | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """``clipcap evaluate`` on test and test_novel: per split its metrics and exact-match rates, and its rows."""
    splits: dict[str, Any] = {}
    split_rows: dict[str, list[dict[str, Any]]] = {}
    predictions: dict[str, dict[str, str]] = {}  # file name -> caption, per split
    for split in ("test", "test_novel"):
        eval_dir = eval_root / split
        cmd = [
            sys.executable,
            "-m",
            "modeling_clipcap.cli",
            "evaluate",
            "--model",
            str(model_dir),
            "--data",
            str(data_dir / split / "metadata.jsonl"),
            "--split",
            split,
            "--output_dir",
            str(eval_dir),
            "--batch_size",
            "64",
            "--num_beams",
            str(cfg["num_beams"]),
            "--spice",
            "off",
        ]
        if not eval_meteor:
            cmd.append("--no_meteor")
        if datastore is not None:
            cmd += ["--datastore", str(datastore)]
        run(cmd, env)
        scores = json.loads((eval_dir / "metrics.json").read_text())
        rows = read_captions(data_dir / split / "metadata.jsonl")
        preds = prediction_map(eval_dir / "predictions.json")
        key = match_key(preds, rows, data_dir / split)
        predictions[split] = {row["file_name"]: preds[key(row)] for row in rows if key(row) in preds}
        split_rows[split] = rows
        keep = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
        splits[split] = {
            "images": len(rows),
            "metrics": {k: scores[k] for k in keep if isinstance(scores.get(k), (int, float))},
            "exact_match": exact_match_rates(predictions[split], rows, key=lambda row: row["file_name"]),
            "skipped_metrics": scores.get("skipped", {}),
        }
    return splits, split_rows


def caption_samples(
    model_dir: Path,
    data_dir: Path,
    sample_dir: Path,
    report_dir: Path,
    split_rows: dict[str, list[dict[str, Any]]],
    cfg: dict[str, Any],
    env: dict[str, str],
    datastore: Path | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Copy sample images (1- and 2-object test scenes, novel ones) and caption them with ``clipcap caption``."""
    n = int(cfg["num_samples"])
    test_rows = split_rows["test"]
    one = [r for r in test_rows if r["num_objects"] == 1][: (n + 1) // 2]
    two = [r for r in test_rows if r["num_objects"] == 2][: n - len(one)]
    novel = split_rows["test_novel"][: max(2, n // 4)]
    if sample_dir.exists():
        shutil.rmtree(sample_dir)
    sample_dir.mkdir()
    chosen: list[tuple[str, dict[str, Any]]] = []
    for split, rows in (("test", one + two), ("test_novel", novel)):
        for row in rows:
            name = f"{split}__{row['file_name']}"
            shutil.copyfile(data_dir / split / row["file_name"], sample_dir / name)
            chosen.append((name, row))
    caption_json = report_dir / "sample_captions.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "modeling_clipcap.cli",
        "caption",
        str(sample_dir),
        "--model",
        str(model_dir),
        "--num_beams",
        str(cfg["num_beams"]),
        "--json",
    ] + (["--datastore", str(datastore)] if datastore is not None else [])
    print("$ " + " ".join(cmd) + f" > {caption_json}", flush=True)
    with open(caption_json, "w", encoding="utf-8") as f:
        status = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=f).returncode
    if status != 0:
        raise SystemExit(f"demo: clipcap caption failed with exit status {status}.")
    captions = {
        Path(r["image"]).name: r["caption"] for r in map(json.loads, caption_json.read_text().splitlines())
    }
    samples = []
    for name, row in chosen:
        prediction = captions.get(name) or ""
        refs = {exact_match_text(c) for c in row["captions"]}
        samples.append(
            {
                "path": str(sample_dir / name),
                "split": name.split("__")[0],
                "prediction": prediction,
                "reference": row["captions"][0],
                "exact": exact_match_text(prediction) in refs,
            }
        )
    return samples, sample_dir


def run_records(model_dir: Path, clip_dir: Path, recipe: str) -> dict[str, Any]:
    """What train.py (``train_results.json``) and, for the clip recipe, pretrain_clip.py recorded."""
    records: dict[str, Any] = {}
    if (model_dir / "train_results.json").is_file():
        records["training"] = json.loads((model_dir / "train_results.json").read_text())
    if recipe == "clip" and (clip_dir / "pretrain_results.json").is_file():
        records["clip_pretraining"] = json.loads((clip_dir / "pretrain_results.json").read_text())
    return records


def stage_env(out: Path, threads: int | None) -> dict[str, str]:
    """The environment of the stages' subprocesses: offline, datasets' cache under ``out``, this checkout
    importable, ``threads`` OpenMP/MKL threads when given."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("HF_DATASETS_CACHE", str(out / "hf_cache"))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_command(data_dir: Path, model_dir: Path, cache_dir: Path, cfg: dict[str, Any]) -> list[str]:
    """``training/train.py`` on the synthetic train / validation splits (each recipe adds its preset)."""
    return [sys.executable, str(TRAINING_DIR / "train.py")] + [
        "--train_file", str(data_dir / "train" / "metadata.jsonl"),
        "--validation_file", str(data_dir / "validation" / "metadata.jsonl"),
        "--output_dir", str(model_dir),
        "--max_train_steps", str(cfg["train_steps"]),
        "--seed", str(cfg["seed"]),
        "--embedding_cache_dir", str(cache_dir),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        preset = find_preset(args.config)
    except FileNotFoundError as err:
        print(f"error: --config {err}", file=sys.stderr)
        return 2
    if not (preset / "config.json").is_file():
        print(f"error: --config {preset} has no config.json.", file=sys.stderr)
        return 2
    cfg = resolve(args, load_settings(preset))
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_dir = out / "report"
    report_dir.mkdir(exist_ok=True)
    env = stage_env(out, args.threads)
    timings: dict[str, float] = {}

    def stage_done(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        print(f"--- {name}: {timings[name]:.0f} s (total {time.time() - start:.0f} s)", flush=True)

    # 1. data
    log("1/6 synthetic data set")
    t0 = time.time()
    sizes = {s: int(cfg[f"{s}_size"]) for s in ("train", "validation", "test", "test_novel")}
    data_dir = make_data(out / "data", sizes, int(cfg["seed"]))
    stage_done("data", t0)

    # 2. tokenizer
    log("2/6 tokenizer (byte-level BPE on the training captions)")
    t0 = time.time()
    train_rows = read_captions(data_dir / "train" / "metadata.jsonl")
    tokenizer = train_tokenizer(
        [c for row in train_rows for c in row["captions"]],
        out / "tokenizer",
        int(cfg["tokenizer_vocab_size"]),
    )
    print(f"{len(tokenizer)} tokens -> {out / 'tokenizer'}")
    stage_done("tokenizer", t0)

    # 3. vision tower + training
    recipe = cfg["recipe"]
    model_config = read_preset(preset)["config"]
    model_dir = out / "model"
    train_cmd = train_command(data_dir, model_dir, out / "embedding_cache", cfg)
    datastore: Path | None = None
    if recipe == "clip":
        log("3/6 image tower, contrastive pretraining (training/pretrain_clip.py, CLIP loss)")
        t0 = time.time()
        pretrain_tiny_clip(data_dir, preset, out, cfg, env)
        positions = 128 if int(cfg["retrieval_k"]) else None  # room for the retrieved captions
        write_random_gpt2(model_config["text_config"], tokenizer, out / "gpt2", int(cfg["seed"]), positions)
        stage_done("clip_pretraining", t0)
        text_model, datastore = learn_from_text(data_dir, out, cfg, env, stage_done)
        train_cmd += [
            "--config",
            str(preset),
            "--vision_model_name_or_path",
            str(out / "clip"),
            "--text_model_name_or_path",
            str(text_model),
            "--tokenizer_name",
            str(out / "tokenizer"),
        ]
        train_cmd += text_training_flags(data_dir, out, cfg, datastore)
    else:
        train_preset = write_recipe_preset(preset, out / f"preset_{recipe}", recipe, model_config, tokenizer)
        train_cmd += ["--config", str(train_preset), "--tokenizer_name", str(out / "tokenizer")]
    log(f"4/6 ClipCap training (training/train.py, recipe {recipe!r})")
    t0 = time.time()
    if model_dir.exists():
        shutil.rmtree(model_dir)
    run(train_cmd, env)
    stage_done("clipcap_training", t0)

    # 5. evaluation on test and test_novel
    log("5/6 clipcap evaluate on test and test_novel")
    t0 = time.time()
    metrics: dict[str, Any] = {"recipe": recipe, "settings": cfg}
    metrics["splits"], split_rows = evaluate_splits(
        model_dir, data_dir, out / "evaluate", cfg, args.eval_meteor, env, datastore
    )
    stage_done("evaluation", t0)

    # 6. captions of sample images with `clipcap caption`, grid, report
    log("6/6 clipcap caption on sample images, report")
    t0 = time.time()
    samples, sample_dir = caption_samples(
        model_dir, data_dir, out / "samples", report_dir, split_rows, cfg, env, datastore
    )
    grid_path = report_dir / "samples.png"
    draw_grid(samples, grid_path)
    stage_done("captions_and_report", t0)

    metrics |= run_records(model_dir, out / "clip", recipe)
    timings["total"] = round(time.time() - start, 1)
    metrics["timings_seconds"] = timings
    metrics["samples"] = [
        {k: v for k, v in s.items() if k != "path"} | {"image": Path(s["path"]).name} for s in samples
    ]
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (report_dir / "report.md").write_text(render_report(metrics, out))
    print(f"\nDemo finished in {timings['total'] / 60:.1f} min.")
    print(f"Report: {report_dir / 'report.md'}")
    print(f"        {report_dir / 'metrics.json'}")
    print(f"        {grid_path}")
    print("Try the model in a web page (needs the app extra: pip install -e '.[app]'):")
    print(f"  clipcap app --model {model_dir} --examples {sample_dir}")
    return 0


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def render_report(metrics: dict[str, Any], out: Path) -> str:
    """The human-readable report (markdown)."""
    settings = metrics["settings"]
    beams = settings["num_beams"]
    decoding = "greedy decoding" if beams == 1 else f"beam search with {beams} beams"
    text = []  # what the unpaired corpus (data/corpus/) was used for
    if int(settings.get("lm_steps") or 0):
        text.append(f"the language model first read it ({settings['lm_steps']} steps)")
    if settings.get("text_only"):
        text.append("ClipCap learnt from it alone (text-only, no image-caption pair)")
    elif settings.get("corpus_text"):
        text.append("ClipCap learnt it as text rows next to the pairs")
    if int(settings.get("retrieval_k") or 0):
        text.append(
            f"{settings['retrieval_k']} captions retrieved from {settings['datastore_file']} per image"
        )
    lines = [
        "# ClipCap demo report",
        "",
        f"Recipe: **{metrics['recipe']}** (see docs/demo.md). Synthetic shapes data set, "
        f"{settings['train_size']} training images, {decoding}.",
        "",
    ]
    if text:
        lines += ["Unpaired text (data/corpus/): " + "; ".join(text) + ".", ""]
    lines += [
        "## Caption metrics (pycocoevalcap; CIDEr-D on its raw scale, 0-10)",
        "",
        "| split | images | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | exact match | 1 object | 2 objects |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, entry in metrics["splits"].items():
        m, em = entry["metrics"], entry["exact_match"]
        lines.append(
            f"| {split} | {entry['images']} | {_fmt(m.get('Bleu_1'))} | {_fmt(m.get('Bleu_4'))} | "
            f"{_fmt(m.get('METEOR'))} | {_fmt(m.get('ROUGE_L'))} | {_fmt(m.get('CIDEr'))} | "
            f"{_fmt(em['all']['rate'])} | {_fmt(em.get('1', {}).get('rate'))} ({em.get('1', {}).get('count', 0)}) | "
            f"{_fmt(em.get('2', {}).get('rate'))} ({em.get('2', {}).get('count', 0)}) |"
        )
    lines += [
        "",
        "Exact match: the predicted caption equals one of the image's references (ignoring case and the final "
        '"."), with the number of images in brackets. `test_novel` images each contain a colour/shape pair '
        "never seen in training.",
        "",
        "## Samples",
        "",
        "![samples](samples.png)",
        "",
        "| image | split | predicted | a reference | exact |",
        "|---|---|---|---|---|",
    ]
    for s in metrics["samples"]:
        lines.append(
            f"| {s['image']} | {s['split']} | {s['prediction']} | {s['reference']} | {'yes' if s['exact'] else 'no'} |"
        )
    lines += ["", "## Time (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics["timings_seconds"].items()]
    lines += [
        "",
        "## Files",
        "",
        f"- model: `{out / 'model'}` (load with `AutoModel.from_pretrained`, or `clipcap caption IMAGES --model` it)",
        f"- predictions: `{out / 'evaluate'}/<split>/predictions.json`",
        f"- data: `{out / 'data'}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
