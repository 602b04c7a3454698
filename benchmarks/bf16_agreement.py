"""Do bf16 captions agree with fp32 captions? Run on a TRAINED model (random weights say nothing).

Loads ``--model DIR`` twice (float32 and bfloat16), captions the same images with greedy and beam search
in both, and reports the share of images whose caption strings are identical (targets: greedy >= 95%,
beam >= 90%), plus a few disagreeing examples. bf16 only pays on CPUs with native bf16 matrix units
(AMX / AVX512-BF16) or on GPUs; the script prints the measured speed of both so that is visible too.

    python benchmarks/bf16_agreement.py --model runs/demo --data path/to/images/ [--limit 200]
    python benchmarks/bf16_agreement.py --model runs/demo --data list.txt   # one image path per line
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_int_list, print_table, set_threads, write_json  # noqa: E402


def read_image_list(data: Path, limit: int | None) -> list[Path]:
    """Image paths from a folder (sorted) or a text file with one path per line."""
    from modeling_clipcap.image_io import list_image_files

    if data.is_dir():
        paths = list_image_files(data, recursive=True)
    elif data.is_file():
        base = data.parent
        paths = []
        for line in data.read_text().splitlines():
            if line.strip():
                p = Path(line.strip())
                paths.append(p if p.is_absolute() else base / p)
    else:
        raise SystemExit(f"--data {data} is neither a folder of images nor a text file of image paths")
    if not paths:
        raise SystemExit(f"--data {data} holds no images")
    return paths[:limit] if limit else paths


def caption_all(
    model: Any, processor: Any, paths: list[Path], batch: int, **gen: Any
) -> tuple[list[str], float]:
    """Captions of ``paths`` (batched) and the seconds taken."""
    from modeling_clipcap.image_io import load_images

    captions, seconds = [], 0.0
    for i in range(0, len(paths), batch):
        images, _ = load_images(paths[i : i + batch])
        inputs = processor(images=images, return_tensors="pt")
        t0 = time.perf_counter()
        ids = model.generate(pixel_values=inputs["pixel_values"], **gen)
        seconds += time.perf_counter() - t0
        captions += processor.batch_decode(ids, skip_special_tokens=True)
    return captions, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a saved ClipCap model directory")
    parser.add_argument("--data", required=True, type=Path, help="folder of images or a file of image paths")
    parser.add_argument("--limit", type=int, default=200, help="at most this many images")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--threads", default="1")
    parser.add_argument(
        "--onednn",
        action="store_true",
        help="also the fp32, bf16 and bf16-vision models with every linear layer through prepacked oneDNN "
        "(modeling_clipcap.cpu_linear): fp32 oneDNN must give the fp32 captions",
    )
    parser.add_argument("--name", default="bf16_agreement")
    args = parser.parse_args(argv)
    from transformers import AutoModel, AutoProcessor

    import modeling_clipcap  # noqa: F401  (registers the Auto classes)

    set_threads(parse_int_list(args.threads)[0])
    paths = read_image_list(args.data, args.limit)
    processor = AutoProcessor.from_pretrained(args.model)
    vision_bf16 = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    if vision_bf16.vision_model is not None:
        # bf16 only where the FLOPs are (the CLIP tower, 8.8 of ~15.6 GFLOPs per greedy caption with
        # ViT-B/32 + GPT-2); mapper and GPT-2 stay fp32, so near-tied next tokens are not flipped.
        vision_bf16.vision_model.to(torch.bfloat16)
    models = {
        "fp32": AutoModel.from_pretrained(args.model, dtype=torch.float32).eval(),
        "bf16": AutoModel.from_pretrained(args.model, dtype=torch.bfloat16).eval(),
        "bf16 vision": vision_bf16,
    }
    if args.onednn:
        from modeling_clipcap.cpu_linear import use_onednn_linear

        for name in ("fp32", "bf16", "bf16 vision"):
            model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
            if name == "bf16":
                model.to(torch.bfloat16)
            elif name == "bf16 vision" and model.vision_model is not None:
                model.vision_model.to(torch.bfloat16)
            if not use_onednn_linear(model):
                raise SystemExit("--onednn: this torch build has no oneDNN linear ops")
            models[f"{name} oneDNN"] = model
    variants = [name for name in models if name != "fp32"]
    rows, examples = [], {}
    for mode, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        gen = dict(num_beams=beams, do_sample=False, max_new_tokens=args.max_new_tokens)
        out = {name: caption_all(m, processor, paths, args.batch, **gen) for name, m in models.items()}
        c32, s32 = out["fp32"]
        for variant in variants:
            c16, s16 = out[variant]
            same = [a == b for a, b in zip(c32, c16)]
            rows.append(
                {
                    "mode": mode,
                    "variant": variant,
                    "images": len(paths),
                    "agree %": 100 * sum(same) / len(same),
                    "fp32 img/s": len(paths) / s32,
                    "variant img/s": len(paths) / s16,
                }
            )
            examples[f"{mode} {variant}"] = [
                {"image": str(p), "fp32": a, variant: b} for p, a, b, s in zip(paths, c32, c16, same) if not s
            ][:10]
    print_table(
        rows,
        ["mode", "variant", "images", "agree %", "fp32 img/s", "variant img/s"],
        title="bf16 vs fp32 captions (bf16 = whole model; bf16 vision = CLIP tower only)",
    )
    for key, items in examples.items():
        for item in items[:2]:
            variant = key.split(" ", 1)[1]
            print(f"  {key} {Path(item['image']).name}: fp32 {item['fp32']!r} | {variant} {item[variant]!r}")
    write_json(args.name, {"args": vars(args), "rows": rows, "disagreements": examples})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
