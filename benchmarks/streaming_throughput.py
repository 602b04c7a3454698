"""Streaming from shards (decode + encode + train) vs the cached path (train on precomputed embeddings).

Real-size model with random weights (CLIP ViT-B/32 tower, GPT-2 small fine-tuned, MLP mapper), real COCO photos
(the repository's ``../shared/real_images``, repeated under distinct keys) written as WebDataset tars:

1. **stages**, one process, one thread, per sample: reading the tar rows, decoding + the image processor, the
   tower's forward (encoding), one training step from embeddings (forward, backward, AdamW); the slowest stage
   is the bottleneck;
2. **end to end**, ``accelerate launch training/train.py --streaming`` with 1 and 2 CPU processes over gloo (one
   thread each, one loader worker each): from the tars (every step decodes and encodes its images) and from the
   Parquet shards ``clipcap embed`` wrote (no image opened). Samples per second per process are timed between
   the first and the last optimizer step (worker start-up and the first step excluded).

    python benchmarks/streaming_throughput.py                # 64 samples, batch 8
    python benchmarks/streaming_throughput.py --quick        # 32 samples, batch 4, stages only at 1 process
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, print_table, set_threads, write_json  # noqa: E402

CAPTIONS = [
    "a man riding a horse on the beach.",
    "a plate of food with broccoli and rice.",
    "a cat sitting on a wooden table.",
    "people walking down a city street.",
    "two dogs playing in the park.",
    "a red bus parked next to a building.",
    "a group of people standing in a kitchen.",
]

DRIVER = r"""
import atexit, json, os, sys, time
sys.path.insert(0, os.path.join(os.environ["REPO"], "training"))
import train

stamps = []
original = train.optimizer_step

def timed(accelerator, model, optimizer, lr_scheduler, group, max_grad_norm):
    out = original(accelerator, model, optimizer, lr_scheduler, group, max_grad_norm)
    samples = sum(int((b["labels"] != -100).any(dim=1).sum()) for b in group)
    stamps.append((time.perf_counter(), samples))
    if len(stamps) == 1:
        atexit.register(lambda: open(os.path.join(os.environ["BENCH_OUT"], f"rank{accelerator.process_index}.json"), "w").write(json.dumps(stamps)))
    return out

train.optimizer_step = timed
sys.exit(train.cli())
"""


def write_setup(root: Path, num_samples: int, num_shards: int) -> dict[str, Any]:
    """A saved real-size random model + processor (tiny BPE tokenizer) and WebDataset tars of real photos."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import CLIPImageProcessor, GPT2TokenizerFast

    from modeling_clipcap import ClipCapProcessor

    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        model = build_model("mlp")
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(CAPTIONS * 4, vocab_size=300, min_frequency=1, show_progress=False)
        bpe.save(str(root / "tokenizer.json"))
        tokenizer = GPT2TokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
        tokenizer.add_special_tokens({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
        model.save_pretrained(model_dir)
        ClipCapProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(model_dir)
    photos = sorted((REPO.parent / "shared" / "real_images").glob("*.jpg"))
    if not photos:
        raise SystemExit("no photos in ../shared/real_images")
    shards = root / "tars"
    shards.mkdir(exist_ok=True)
    per_shard = num_samples // num_shards
    for s in range(num_shards):
        with tarfile.open(shards / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                for suffix, data in (
                    (".jpg", photos[n % len(photos)].read_bytes()),
                    (".txt", CAPTIONS[n % 7].encode()),
                ):
                    info = tarfile.TarInfo(f"{n:06d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"model": model_dir, "pattern": str(shards / "*.tar"), "samples": per_shard * num_shards}


def stage_times(setup: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """Seconds per sample of each stage, one process, one thread."""
    from modeling_clipcap import ClipCapForConditionalGeneration, ClipCapProcessor
    from modeling_clipcap.data import CaptionCollator
    from modeling_clipcap.image_io import load_image
    from modeling_clipcap.shards import expand_shards, iter_shard_rows

    set_threads(1)
    model = ClipCapForConditionalGeneration.from_pretrained(setup["model"])
    processor = ClipCapProcessor.from_pretrained(setup["model"])
    shards = expand_shards(setup["pattern"])
    start = time.perf_counter()
    rows = list(iter_shard_rows(shards))
    read = (time.perf_counter() - start) / len(rows)
    start = time.perf_counter()
    images = [load_image(r["image"]) for r in rows]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    decode = (time.perf_counter() - start) / len(rows)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        embeds = torch.cat(
            [
                model.get_image_embeddings(pixels[i : i + batch]).pooler_output
                for i in range(0, len(rows), batch)
            ]
        )
    encode = (time.perf_counter() - start) / len(rows)
    collator = CaptionCollator(processor.tokenizer, 32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    steps = list(range(0, len(rows), batch))[:4]
    start = time.perf_counter()
    for i in steps:
        chunk = collator(
            [
                {"image_embeds": e, "caption": r["caption"]}
                for e, r in zip(embeds[i : i + batch], rows[i : i + batch])
            ]
        )
        model(**chunk).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    step = (time.perf_counter() - start) / (len(steps) * batch)
    table = [
        {"stage": "read tar rows (datasets webdataset builder)", "ms/sample": 1000 * read},
        {"stage": "decode + image processor (224x224)", "ms/sample": 1000 * decode},
        {"stage": "encode: ViT-B/32 forward", "ms/sample": 1000 * encode},
        {"stage": "train step from embeddings (GPT-2 + MLP, AdamW)", "ms/sample": 1000 * step},
    ]
    slowest = max(table, key=lambda r: r["ms/sample"])
    for row in table:
        row["bottleneck"] = "<-" if row is slowest else ""
    return table


def end_to_end(setup: dict[str, Any], root: Path, source: str, processes: int, batch: int) -> dict[str, Any]:
    """samples/s per process of ``train.py --streaming`` from ``source`` on ``processes`` CPU ranks."""
    out = Path(tempfile.mkdtemp(prefix=f"run-{processes}-", dir=root))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    launch += ["--dynamo_backend", "no", "--num_processes", str(processes), "--main_process_port", str(port)]
    launch += ["--multi_gpu"] if processes > 1 else ["--cpu"]
    argv = ["--model_name_or_path", str(setup["model"]), "--train_file", source, "--streaming"]
    argv += [
        "--max_train_steps",
        "1000",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        str(batch),
    ]
    argv += ["--dataloader_num_workers", "1", "--num_warmup_steps", "0", "--output_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", REPO=str(REPO), BENCH_OUT=str(out), ACCELERATE_USE_CPU="true")
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HOME=str(root / "hf_home"))
    proc = subprocess.run(launch + [str(driver)] + argv, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed:\n{proc.stderr[-3000:]}")
    rates = []
    for rank in range(processes):
        stamps = json.loads((out / f"rank{rank}.json").read_text())
        (t0, _), (t1, _) = stamps[0], stamps[-1]
        rates.append(sum(n for _, n in stamps[1:]) / (t1 - t0))
    return {"per_process": rates, "total": sum(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.batch = 32, 4
    root = Path(tempfile.mkdtemp(prefix="clipcap-streaming-bench-"))
    setup = write_setup(root, args.samples, args.shards)
    stages = stage_times(setup, args.batch)
    print_table(stages, ["stage", "ms/sample", "bottleneck"], title="Stages (1 process, 1 thread)")

    from modeling_clipcap.cli import main as clipcap

    start = time.perf_counter()
    clipcap(
        [
            "embed",
            "--model",
            str(setup["model"]),
            "--data",
            setup["pattern"],
            "--output_dir",
            str(root / "emb"),
        ]
    )
    embed_rate = setup["samples"] / (time.perf_counter() - start)

    rows = []
    for processes in (1,) if args.quick else (1, 2):
        for label, source in (
            ("shards: decode+encode+train", setup["pattern"]),
            ("cached: embed parquet, train", str(root / "emb" / "*.parquet")),
        ):
            result = end_to_end(setup, root, source, processes, args.batch)
            rows.append(
                {
                    "path": label,
                    "processes": processes,
                    "samples/s per process": " / ".join(f"{r:.2f}" for r in result["per_process"]),
                    "samples/s total": result["total"],
                }
            )
    print_table(
        rows, ["path", "processes", "samples/s per process", "samples/s total"], title="End to end (train.py)"
    )
    print(f"clipcap embed (1 process, 1 thread, in the benchmark process): {embed_rate:.2f} images/s")
    write_json(
        "streaming_throughput",
        {
            "stages": stages,
            "end_to_end": rows,
            "embed_images_per_s": embed_rate,
            "samples": setup["samples"],
            "batch": args.batch,
        },
    )


if __name__ == "__main__":
    main()
