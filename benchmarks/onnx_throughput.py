"""ONNX Runtime vs PyTorch captioning, fp32 and int8, side by side in one run.

Two parts (both by default):

* ``--real-size``: CLIP ViT-B/32 + GPT-2 124M with random weights (``common.build_model``), exported once with
  ``clipcap export``'s code (cached under ``CLIPCAP_BENCH_CACHE``). Each row captions the same batch of random
  images with exactly 20 new tokens (``min_new_tokens = max_new_tokens``): PyTorch fp32 (``model.generate``), ONNX
  Runtime fp32, ONNX Runtime int8 (``clipcap export --int8``: ``onnxruntime.quantization.quantize_dynamic``) and
  PyTorch int8 (``torch.ao.quantization.quantize_dynamic`` on the ``nn.Linear`` layers of the tower and the LM;
  GPT-2's blocks are ``Conv1D`` and stay fp32; torch marks this API deprecated). Reported: images/s, the ratio to
  PyTorch fp32 measured in the same run, and the share of captions (token sequences) equal to PyTorch fp32's.
* ``--demo DIR``: the demo's trained model (``training/demo.py`` output): the same four variants caption its test
  split through the one captioning path (``caption_items``, batch 32, the model's generation config), with
  images/s, the share of captions equal to PyTorch fp32's, exact match with the references and CIDEr-D.

    python benchmarks/onnx_throughput.py --threads 1 --batch_size 32 --num_beams 1,5 --demo /work/demo_base
    python benchmarks/onnx_throughput.py --num_beams 1,5 --original 4  # and the original code's speed
    python benchmarks/onnx_throughput.py --quick          # batch 4, 8 tokens, 64 demo images
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CAPTION_TOKENS,
    MODEL_CACHE,
    PAD_TOKEN_ID,
    build_model,
    make_pixel_values,
    print_table,
    set_threads,
    write_json,
)

VARIANTS = ("pytorch fp32", "onnx fp32", "onnx int8", "pytorch int8")


def torch_int8(model: Any) -> Any:
    """A copy with PyTorch dynamic int8 ``nn.Linear`` layers in the tower and the language model (the mapper stays
    fp32: the model reads its dtype from its parameters, which quantized layers no longer have)."""
    quantized = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization is deprecated (torchao replaces it)
        for name in ("vision_model", "language_model"):
            part = getattr(quantized.model if name == "vision_model" else quantized, name)
            part = torch.ao.quantization.quantize_dynamic(part, {torch.nn.Linear}, dtype=torch.qint8)
            if name == "vision_model":
                quantized.model.vision_model = part
            else:
                quantized.language_model = part
    return quantized.eval()


def export_cached(model: Any, folder: Path, processor: Any = None) -> Path:
    """``clipcap export --int8`` of ``model`` into ``folder``, unless an export is already there (its int8 graphs
    are re-made when they were quantized with other settings than this release's)."""
    from modeling_clipcap.onnx_export import INT8_SETTINGS, add_int8_graphs, export_onnx
    from modeling_clipcap.onnx_runtime import is_onnx_export

    t0 = time.perf_counter()
    if not is_onnx_export(folder):
        export_onnx(model, folder, processor=processor, int8=True)
        print(f"exported to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    elif json.loads((folder / "onnx_manifest.json").read_text()).get("int8_settings") != INT8_SETTINGS:
        add_int8_graphs(folder)
        print(f"quantized {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def interleaved_best(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """Best wall time (s) of each ``runs[name]()``, the variants taking turns (A B C D A B C D ...) so that a
    change in the machine's load hits all of them alike."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def load_variants(model: Any, folder: Path) -> dict[str, Any]:
    from modeling_clipcap.onnx_runtime import ClipCapOnnxForConditionalGeneration

    return {
        "pytorch fp32": model,
        "onnx fp32": ClipCapOnnxForConditionalGeneration.from_pretrained(folder),
        "onnx int8": ClipCapOnnxForConditionalGeneration.from_pretrained(folder, int8=True),
        "pytorch int8": torch_int8(model),
    }


def agreement(sequences: list, reference: list) -> float:
    return sum(a == b for a, b in zip(sequences, reference)) / max(len(reference), 1)


def real_size(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = build_model("mlp")
    variants = load_variants(model, export_cached(model, MODEL_CACHE / "onnx-mlp"))
    pixel_values = make_pixel_values(args.batch_size)
    rows = []
    for num_beams in args.num_beams:
        options = dict(
            num_beams=num_beams,
            do_sample=False,
            min_new_tokens=args.tokens,
            max_new_tokens=args.tokens,
            pad_token_id=PAD_TOKEN_ID,
        )
        outputs: dict[str, list] = {}
        runs = {}
        for name, variant in variants.items():
            variant.generate(pixel_values=pixel_values[:2], **options)  # warm-up

            def run(
                variant: Any = variant, name: str = name, options: dict = options, outputs: dict = outputs
            ) -> None:
                outputs[name] = variant.generate(pixel_values=pixel_values, **options).tolist()

            runs[name] = run
        if args.original and args.tokens != CAPTION_TOKENS:
            raise SystemExit(
                f"--original writes {CAPTION_TOKENS} tokens per caption: use --tokens {CAPTION_TOKENS}"
            )
        if args.original:  # the original code's algorithm (caption_throughput.run_original), a few images
            from caption_throughput import run_original

            few = pixel_values[: args.original]
            runs["original"] = lambda few=few, num_beams=num_beams: run_original(model, few, num_beams)
        seconds = interleaved_best(runs, args.repeats)
        if args.original:
            original_rate = args.original / seconds.pop("original")
        for name in variants:
            rows.append(
                {
                    "model": "ViT-B/32 + GPT-2 124M (random)",
                    "variant": name,
                    "num_beams": num_beams,
                    "batch": args.batch_size,
                    "threads": args.threads,
                    "img/s": args.batch_size / seconds[name],
                    "seconds": seconds[name],
                }
            )
            if args.original:
                rows[-1]["x original"] = rows[-1]["img/s"] / original_rate
        base = next(r for r in rows if r["variant"] == "pytorch fp32" and r["num_beams"] == num_beams)
        for row in rows:
            if row["num_beams"] == num_beams:
                row["x pytorch fp32"] = row["img/s"] / base["img/s"]
                row["same tokens"] = agreement(outputs[row["variant"]], outputs["pytorch fp32"])
    return rows


def read_split(folder: Path, limit: int | None) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    rows, references = [], {}
    for line in (folder / "metadata.jsonl").read_text().splitlines()[:limit]:
        record = json.loads(line)
        rows.append({"image_id": record["file_name"], "image": str(folder / record["file_name"])})
        references[record["file_name"]] = record["captions"]
    return rows, references


def demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    from modeling_clipcap.caption_metrics import compute_caption_metrics, exact_match_rate
    from modeling_clipcap.captioning import caption_items, load_captioner

    demo_dir = Path(args.demo)
    model, processor = load_captioner(demo_dir / "model", device="cpu")
    folder = export_cached(model, MODEL_CACHE / f"onnx-demo-{demo_dir.name}", processor)
    variants = load_variants(model, folder)
    items, references = read_split(demo_dir / "data" / "test", args.demo_images)
    options = {} if args.demo_max_new_tokens is None else {"max_new_tokens": args.demo_max_new_tokens}
    captions: dict[str, dict] = {}
    runs = {}
    for name, variant in variants.items():

        def run(variant: Any = variant, name: str = name) -> None:
            captions[name] = {
                image_id: texts[0]
                for image_id, texts, _ in caption_items(
                    variant, processor, items, batch_size=args.batch_size, **options
                )
            }

        runs[name] = run
    seconds = interleaved_best(runs, args.demo_repeats)
    rows = []
    for name in variants:
        metrics = compute_caption_metrics(captions[name], references, meteor=False)
        rows.append(
            {
                "model": f"demo ({demo_dir.name}), test split",
                "variant": name,
                "images": len(items),
                "batch": args.batch_size,
                "threads": args.threads,
                "img/s": len(items) / seconds[name],
                "CIDEr-D": metrics["CIDEr"],
                "exact match": exact_match_rate(captions[name], references),
            }
        )
    base = next(r for r in rows if r["variant"] == "pytorch fp32")
    for row in rows:
        row["x pytorch fp32"] = row["img/s"] / base["img/s"]
        same = [captions[row["variant"]][k] == captions["pytorch fp32"][k] for k in captions["pytorch fp32"]]
        row["same captions"] = sum(same) / len(same)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_beams", default="1", help="comma-separated beam widths (real-size part)")
    parser.add_argument(
        "--tokens", type=int, default=CAPTION_TOKENS, help="tokens per caption (real-size part)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per row, interleaved (best reported)"
    )
    parser.add_argument("--demo_repeats", type=int, default=2, help="timed runs per demo row, interleaved")
    parser.add_argument("--demo", default=None, help="a demo output folder (with model/ and data/test/)")
    parser.add_argument("--demo_images", type=int, default=None, help="caption only the first N test images")
    parser.add_argument("--demo_max_new_tokens", type=int, default=None)
    parser.add_argument("--no_real_size", action="store_true", help="skip the real-size part")
    parser.add_argument(
        "--original",
        type=int,
        default=0,
        help="also time the original code's algorithm (one image at a time, no cache; caption_throughput.py) on "
        "this many images, interleaved with the variants, and report each variant's speed-up over it",
    )
    parser.add_argument("--quick", action="store_true", help="batch 4, 8 tokens, one repeat, 64 demo images")
    args = parser.parse_args(argv)
    args.num_beams = [int(b) for b in args.num_beams.split(",")]
    if args.quick:
        args.batch_size, args.tokens, args.repeats, args.demo_images, args.demo_repeats = 4, 8, 1, 64, 1
    set_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    payload: dict[str, Any] = {
        "args": vars(args),
        "note": "one run; variants measured side by side, their repeats interleaved; best time per variant",
        "load_average_at_start": os.getloadavg(),
    }
    if not args.no_real_size:
        rows = real_size(args)
        payload["real_size"] = rows
        print_table(
            rows,
            [
                "variant",
                "num_beams",
                "batch",
                "threads",
                "img/s",
                "x pytorch fp32",
                "x original",
                "same tokens",
            ],
            "ViT-B/32 + GPT-2 124M, random weights, exactly 20 tokens",
        )
    if args.demo:
        rows = demo(args)
        payload["demo"] = rows
        print_table(
            rows,
            ["variant", "images", "batch", "threads", "img/s", "x pytorch fp32", "same captions", "exact match",
             "CIDEr-D"],
            "demo model, test split, greedy (its generation config)",
        )  # fmt: skip
    write_json("onnx_throughput" + ("_quick" if args.quick else ""), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
