"""Image-embedding extraction: the training cache (each unique image once, batched, DataLoader workers) vs the
original's feature extraction (each image decoded and encoded once per caption, at batch 1).

Real JPEG/PNG decoding is included: the photographs of ``../shared/real_images`` are written as resized
JPEG and PNG copies (distinct files) to a temporary folder (never the repository). Every image has
``--captions`` captions, as COCO's 5. The CLIP ViT-B/32 tower has random weights (same work as trained).

    python benchmarks/embedding_extraction.py            # 32 images x 5 captions, 1 and 2 threads
    python benchmarks/embedding_extraction.py --quick    # 8 images, 1 thread
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CLIP_GFLOPS_PER_IMAGE,
    build_model,
    matmul_gflops,
    measure,
    parse_int_list,
    print_table,
    set_threads,
    write_json,
)

REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "real_images"


def write_image_copies(source_dir: Path, out_dir: Path, count: int) -> list[Path]:
    """``count`` distinct resized JPEG/PNG copies of the photographs in ``source_dir`` (alternating formats)."""
    from PIL import Image

    sources = sorted(p for p in source_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not sources:
        raise SystemExit(f"no JPEG/PNG photographs in {source_dir}; pass --images-from DIR")
    paths = []
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as img:
            img = img.convert("RGB")
            scale = 640 / max(img.size) * (1.0 - 0.02 * (i // len(sources)))  # COCO-like size, distinct files
            size = (max(32, int(img.width * scale)), max(32, int(img.height * scale)))
            img = img.resize(size, Image.BICUBIC)
            path = out_dir / f"img{i:04d}.{'png' if i % 2 else 'jpg'}"
            img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return paths


class ForwardCounter:
    """Counts vision-tower forward calls and the images they encode."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.images = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        self.calls += 1
        self.images += int(pixel_values.shape[0])

    def reset(self) -> None:
        self.calls = self.images = 0


def once_per_caption(model: Any, processor: Any, pairs: list[tuple[Path, int]]) -> torch.Tensor:
    """The original habit: for every (image, caption) pair, decode the image and encode it at batch 1."""
    from PIL import Image

    out = []
    with torch.no_grad():
        for path, _caption in pairs:
            with Image.open(path) as img:
                pixel_values = processor(images=[img.convert("RGB")], return_tensors="pt")["pixel_values"]
            out.append(model.get_image_embeddings(pixel_values).pooler_output)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="unique images")
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the cache")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--images-from", type=Path, default=REAL_IMAGES, help="folder of photographs to copy")
    parser.add_argument("--quick", action="store_true", help="8 images, 1 thread")
    parser.add_argument("--name", default="embedding_extraction")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.threads = 8, "1"
        args.name = args.name + "_quick" if args.name == "embedding_extraction" else args.name
    from transformers import CLIPImageProcessor

    from modeling_clipcap.embedding_cache import build_embedding_cache

    started = time.time()
    model = build_model("mlp")
    processor = CLIPImageProcessor()
    counter = ForwardCounter(model.vision_model)
    rows, limits = [], {}
    with tempfile.TemporaryDirectory(prefix="clipcap-bench-images-") as tmp:
        tmp = Path(tmp)
        paths = write_image_copies(args.images_from, tmp, args.images)
        pairs = [
            (p, c) for p in paths for c in range(args.captions)
        ]  # one row per caption, as a caption file
        for threads in parse_int_list(args.threads):
            set_threads(threads)
            limits[str(threads)] = matmul_gflops(torch.float32)
            once_per_caption(model, processor, pairs[:1])  # warm-up
            counter.reset()
            base = measure(lambda: once_per_caption(model, processor, pairs))
            base_row = {
                "threads": threads,
                "method": "once per caption, batch 1",
                "images": args.images,
                "captions": len(pairs),
                "encoder calls": counter.calls,
                "images encoded": counter.images,
                "seconds": base["seconds"],
                "img/s": args.images / base["seconds"],
                "% limit": 100
                * counter.images
                * CLIP_GFLOPS_PER_IMAGE
                / base["seconds"]
                / limits[str(threads)],
                "peak MiB": base["peak_rss_mb"],
            }
            rows.append(base_row)
            print(base_row, flush=True)
            counter.reset()

            def cached(cache_dir: Path = tmp / f"cache{threads}") -> Any:
                return build_embedding_cache(
                    model,
                    processor,
                    images=[str(p) for p, _ in pairs],
                    keys=[str(p) for p, _ in pairs],
                    cache_dir=cache_dir,
                    batch_size=args.batch_size,
                    num_workers=args.workers,
                    show_progress=False,
                )

            ours = measure(cached)
            row = {
                "threads": threads,
                "method": f"cache: unique images, batch {args.batch_size}, {args.workers} workers",
                "images": args.images,
                "captions": len(pairs),
                "encoder calls": counter.calls,
                "images encoded": counter.images,
                "seconds": ours["seconds"],
                "img/s": args.images / ours["seconds"],
                "% limit": 100
                * counter.images
                * CLIP_GFLOPS_PER_IMAGE
                / ours["seconds"]
                / limits[str(threads)],
                "peak MiB": ours["peak_rss_mb"],
                "fewer forwards": base_row["images encoded"] / max(counter.images, 1),
                "fewer calls": base_row["encoder calls"] / max(counter.calls, 1),
                "speedup": base["seconds"] / ours["seconds"],
            }
            rows.append(row)
            print(row, flush=True)
    columns = [
        "threads", "method", "images", "captions", "encoder calls", "images encoded", "img/s", "% limit",
        "fewer forwards", "speedup", "peak MiB",
    ]  # fmt: skip
    print_table(rows, columns, title="Embedding extraction (decoding included)")
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
