"""The machine's FLOP limit and the work model the other benchmarks use.

Measures square-matmul GFLOP/s in fp32 and bf16 at each thread count (the limit a variant's "necessary"
GFLOP/s is compared with) and prints the per-image / per-sample work of each variant:

* captioning: CLIP ViT-B/32 8.8 GFLOPs + mapper + GPT-2 over the prefix once per image + beams x 20
  generated tokens (GPT-2 about 0.25 GFLOPs per token forward including the 768 x 50257 output layer);
* the original-style decoding's actual work: full forward over the growing sequence with the output layer on
  every position, per beam, no cache.

    python benchmarks/flops.py [--threads 1,2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CAPTION_TOKENS,
    CLIP_GFLOPS_PER_IMAGE,
    build_config,
    count_gpt2_gflops_per_token,
    mapper_gflops,
    matmul_gflops,
    parse_int_list,
    print_table,
    set_threads,
    write_json,
)


class _ConfigOnly:
    """Enough of a model for the FLOP formulas (no weights built)."""

    def __init__(self, mapping: str):
        self.config = build_config(mapping)


def original_decode_gflops(model: _ConfigOnly, beams: int) -> float:
    """Work of the original decoding per image: step t re-runs the whole sequence (K + t positions) with the
    output layer on every position; beam search runs ``beams`` sequences from the second step on."""
    body, head = count_gpt2_gflops_per_token(model)
    k = model.config.prefix_length
    total = 0.0
    for t in range(CAPTION_TOKENS):
        rows = 1 if (t == 0 or beams == 1) else beams
        total += rows * (k + t) * (body + head)
    return total + mapper_gflops(model) + CLIP_GFLOPS_PER_IMAGE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--quick", action="store_true", help="1 thread, sizes 512,1024")
    args = parser.parse_args(argv)
    if args.quick:
        args.threads, args.sizes = "1", "512,1024"
    rows = []
    for threads in parse_int_list(args.threads):
        set_threads(threads)
        for n in parse_int_list(args.sizes):
            rows.append(
                {
                    "threads": threads,
                    "n": n,
                    "fp32 GFLOP/s": matmul_gflops(torch.float32, sizes=(n,), seconds=0.5),
                    "bf16 GFLOP/s": matmul_gflops(torch.bfloat16, sizes=(min(n, 256),), seconds=0.3),
                }
            )
            print(rows[-1], flush=True)
    print_table(
        rows, ["threads", "n", "fp32 GFLOP/s", "bf16 GFLOP/s"], title="Square matmul (bf16 at n <= 256)"
    )
    from common import necessary_caption_gflops

    work = []
    for mapping in ("mlp", "transformer"):
        m = _ConfigOnly(mapping)
        body, head = count_gpt2_gflops_per_token(m)
        for beams in (1, 5):
            work.append(
                {
                    "mapper": mapping,
                    "beams": beams,
                    "necessary GFLOP/img": necessary_caption_gflops(m, beams),
                    "original-style GFLOP/img": original_decode_gflops(m, beams),
                    "mapper GFLOP": mapper_gflops(m),
                    "GPT-2 body+head GFLOP/token": body + head,
                }
            )
    print_table(
        work,
        [
            "mapper",
            "beams",
            "necessary GFLOP/img",
            "original-style GFLOP/img",
            "mapper GFLOP",
            "GPT-2 body+head GFLOP/token",
        ],
        title=f"Work per image ({CAPTION_TOKENS} tokens, CLIP {CLIP_GFLOPS_PER_IMAGE} GFLOPs included)",
    )
    write_json("flops", {"args": vars(args), "matmul": rows, "work": work})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
