"""The GPU run (``benchmarks/gpu.sh``): captioning throughput, CPU agreement, COCO-test-size beam 5.

Everything comes from random real-size weights (CLIP ViT-B/32 + projection, GPT-2 124M, MLP mapper K=10, as
in ``caption_throughput.py``) and synthetic images (seeded random pixel tensors): no network, no data set.
Every caption has exactly ``--tokens`` tokens (``min_new_tokens = max_new_tokens``) so every row does the
same work. Parts, each recorded in the JSON even when it fails (its error is kept, the next part runs):

* ``throughput``: images/s at each batch (64, 256) x dtype (fp32, bf16, fp16) x mode (greedy, beam 5),
  end to end from pixel tensors on the device (tower + mapper + ``generate``), with the peak device memory;
* ``cpu_agreement``: fp32 greedy on a fixed set of images on the device and on the CPU, token by token
  (TF32 off for this part, so fp32 is fp32 on both); bf16 / fp16 greedy against fp32 on the device;
* ``coco_beam5``: the time to caption 5,000 images (COCO's Karpathy test split size) with beam 5, in bf16
  and fp32, pixel tensors made on the host and copied in per batch (JPEG decoding not included);
* ``compiled`` (``--compile``): greedy with a static cache and ``torch.compile`` (transformers'
  ``CompileConfig``), its first call (compilation) and its speed against eager, and whether its tokens match.

``--smoke`` runs every part with a tiny model, tiny batches and a few images, on whatever device there is
(CPU in CI): it checks the script end to end, not the speed.

    python benchmarks/gpu_run.py --out_dir benchmarks/results            # what gpu.sh runs
    python benchmarks/gpu_run.py --smoke --out_dir /tmp/gpu-smoke        # CPU, about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build_model,
    cpu_info,
    fmt,
    make_pixel_values,
    necessary_caption_gflops,
    parse_int_list,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_smoke_model(mapping: str = "mlp") -> Any:
    """A tiny ClipCap model (vision 32x32, GPT-2 width 32, vocabulary 300, K=4) with random weights, eval mode."""
    from transformers import CLIPVisionConfig, GPT2Config

    from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration

    torch.manual_seed(0)
    config = ClipCapConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=24,
        ),
        text_config=GPT2Config(
            vocab_size=300,
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=299,
            eos_token_id=299,
        ),
        mapping_type=mapping,
        prefix_length=4,
        clip_length=3,
        mapping_num_layers=2,
        mapping_num_heads=4,
    )
    return ClipCapForConditionalGeneration(config).eval()


def image_size(model: Any) -> int:
    return int(model.config.vision_config.image_size)


def pixels(model: Any, batch: int, seed: int) -> torch.Tensor:
    """(batch, 3, S, S) seeded random pixel values for the model's tower (S = its image size)."""
    size = image_size(model)
    if size == 224:
        return make_pixel_values(batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from common import peak_rss_mb

    return peak_rss_mb()


def caption(
    model: Any, pixel_values: torch.Tensor, num_beams: int, tokens: int, **options: Any
) -> torch.Tensor:
    """``generate`` with exactly ``tokens`` new tokens: (B, 3, S, S) -> (B, tokens) ids."""
    eos = model.config.text_config.eos_token_id
    return model.generate(
        pixel_values=pixel_values,
        num_beams=num_beams,
        do_sample=False,
        min_new_tokens=tokens,
        max_new_tokens=tokens,
        pad_token_id=eos,
        **options,
    )


def timed(device: torch.device, fn: Any, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``repeats`` calls of ``fn`` (device synchronised around each)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], times


# --------------------------------------------------------------------------------------------- parts


def part_throughput(models: dict[str, Any], device: torch.device, args: Any) -> list[dict[str, Any]]:
    rows = []
    for dtype_name, model in models.items():
        for mode, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
            for batch in parse_int_list(args.batches):
                pv = pixels(model, batch, seed=batch).to(device)
                caption(model, pv, beams, args.tokens)  # warm-up: kernels, allocator, autotuning
                reset_peak(device)
                seconds, times = timed(
                    device, lambda m=model, x=pv, b=beams: caption(m, x, b, args.tokens), args.repeats
                )
                work = necessary_caption_gflops(model, beams) * batch if not args.smoke else None
                row = {
                    "dtype": dtype_name,
                    "mode": mode,
                    "batch": batch,
                    "img/s": batch / seconds,
                    "seconds": seconds,
                    "times": times,
                    "TFLOP/s (necessary)": None if work is None else work / seconds / 1000,
                    "peak MiB": peak_mib(device),
                }
                print(f"  [{dtype_name} {mode} b{batch}] {row['img/s']:.1f} img/s", flush=True)
                rows.append(row)
    return rows


def part_agreement(models: dict[str, Any], device: torch.device, args: Any) -> dict[str, Any]:
    """fp32 greedy, device vs CPU, on a fixed set; and each low-precision dtype vs fp32 on the device."""
    fp32 = models["fp32"]
    pv = pixels(fp32, args.agreement_images, seed=12345)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        on_device = caption(fp32, pv.to(device), 1, args.tokens).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    cpu_model = fp32 if device.type == "cpu" else fp32.to("cpu")
    try:
        on_cpu = caption(cpu_model, pv, 1, args.tokens)
    finally:
        if device.type != "cpu":
            fp32.to(device)
    same = (on_device == on_cpu).all(dim=1)
    result: dict[str, Any] = {
        "images": args.agreement_images,
        "device": str(device),
        "fp32 greedy identical captions (device vs CPU)": float(same.float().mean()),
        "fp32 greedy identical tokens (device vs CPU)": float((on_device == on_cpu).float().mean()),
        "first differing images": [int(i) for i in (~same).nonzero().flatten()[:10]],
    }
    for name, model in models.items():
        if name == "fp32":
            continue
        low = caption(model, pv.to(device), 1, args.tokens).cpu()
        result[f"{name} greedy identical captions (vs fp32 on the device)"] = float(
            (low == on_device).all(dim=1).float().mean()
        )
    print(f"  agreement: {json.dumps(result)}", flush=True)
    return result


def part_coco(models: dict[str, Any], device: torch.device, args: Any) -> list[dict[str, Any]]:
    """Time to caption ``--coco_images`` images with beam ``--beams`` at batch ``--coco_batch``."""
    rows = []
    for dtype_name in [d for d in args.coco_dtypes.split(",") if d]:
        model = models[dtype_name]
        batch = args.coco_batch
        caption(model, pixels(model, batch, seed=0).to(device), args.beams, args.tokens)  # warm-up
        reset_peak(device)
        synchronize(device)
        started = time.perf_counter()
        done = 0
        while done < args.coco_images:
            n = min(batch, args.coco_images - done)
            pv = pixels(model, n, seed=done).to(device, non_blocking=True)  # made on the host, copied in
            caption(model, pv, args.beams, args.tokens)
            done += n
        synchronize(device)
        seconds = time.perf_counter() - started
        row = {
            "dtype": dtype_name,
            "images": args.coco_images,
            "batch": batch,
            "beams": args.beams,
            "seconds": seconds,
            "img/s": args.coco_images / seconds,
            "peak MiB": peak_mib(device),
        }
        print(f"  [coco {dtype_name}] {args.coco_images} images in {seconds:.1f} s", flush=True)
        rows.append(row)
    return rows


def part_compiled(models: dict[str, Any], device: torch.device, args: Any) -> list[dict[str, Any]]:
    """Greedy with a static cache + ``torch.compile`` (``modeling_clipcap.compiled_decoding``) against eager."""
    from modeling_clipcap.compiled_decoding import compiled_decoding_kwargs

    rows = []
    for dtype_name in [d for d in args.compile_dtypes.split(",") if d]:
        model = models[dtype_name]
        batch = parse_int_list(args.batches)[0]
        pv = pixels(model, batch, seed=7).to(device)
        options = compiled_decoding_kwargs(model)
        eager_ids = caption(model, pv, 1, args.tokens)
        synchronize(device)
        t0 = time.perf_counter()
        compiled_ids = caption(model, pv, 1, args.tokens, **options)
        synchronize(device)
        first = time.perf_counter() - t0
        eager_s, _ = timed(device, lambda m=model, x=pv: caption(m, x, 1, args.tokens), args.repeats)
        compiled_s, _ = timed(
            device, lambda m=model, x=pv, o=options: caption(m, x, 1, args.tokens, **o), args.repeats
        )
        row = {
            "dtype": dtype_name,
            "batch": batch,
            "eager img/s": batch / eager_s,
            "compiled img/s": batch / compiled_s,
            "speed-up": eager_s / compiled_s,
            "first call s (compiles)": first,
            "same tokens as eager": bool(torch.equal(eager_ids.cpu(), compiled_ids.cpu())),
        }
        print(f"  [compiled {dtype_name} b{batch}] {json.dumps(row)}", flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- output


def markdown(result: dict[str, Any]) -> str:
    """The run as Markdown tables."""
    lines = [f"# GPU run ({result['device_name']}, {'smoke' if result['smoke'] else 'full'})", ""]

    def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for row in rows:
            lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
        lines.append("")

    parts = result["parts"]
    if isinstance(parts.get("throughput"), list):
        lines.append(f"## Captioning throughput ({result['args']['tokens']} tokens per caption)\n")
        table(parts["throughput"], ["dtype", "mode", "batch", "img/s", "TFLOP/s (necessary)", "peak MiB"])
    if isinstance(parts.get("cpu_agreement"), dict):
        lines.append("## Agreement\n")
        table([{"measure": k, "value": v} for k, v in parts["cpu_agreement"].items()], ["measure", "value"])
    if isinstance(parts.get("coco_beam5"), list):
        lines.append("## Time to caption a COCO-test-size set with beam search\n")
        table(parts["coco_beam5"], ["dtype", "images", "batch", "beams", "seconds", "img/s", "peak MiB"])
    if isinstance(parts.get("compiled"), list):
        lines.append("## Static cache + torch.compile (greedy)\n")
        table(
            parts["compiled"],
            ["dtype", "batch", "eager img/s", "compiled img/s", "speed-up", "first call s (compiles)",
             "same tokens as eager"],
        )  # fmt: skip
    train = result.get("training")
    if isinstance(train, dict) and "median step s" in train:
        lines.append("## bf16 mixed-precision training (accelerate launch)\n")
        table([train], ["recipe", "batch", "steps", "median step s", "samples/s", "peak MiB", "final loss"])
    for name, value in {**parts, "training": train}.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"- part `{name}` failed: {value['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU in CI time)")
    parser.add_argument("--out_dir", default="benchmarks/results", help="where gpu.json and gpu.md go")
    parser.add_argument("--name", default=None, help="file stem (default gpu, or gpu_smoke with --smoke)")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per caption (min = max)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement_images", type=int, default=64)
    parser.add_argument("--coco_images", type=int, default=5000)
    parser.add_argument("--coco_batch", type=int, default=256)
    parser.add_argument("--coco_dtypes", default="bf16,fp32")
    parser.add_argument("--compile", action="store_true", help="add the static cache + torch.compile part")
    parser.add_argument("--compile_dtypes", default="bf16")
    parser.add_argument("--parts", default="throughput,cpu_agreement,coco_beam5,compiled")
    parser.add_argument(
        "--training_json", default=None, help="a gpu_train.py result to fold into the JSON and table"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.tokens, args.repeats = "2,4", 4, 1
        args.agreement_images, args.coco_images, args.coco_batch = 4, 10, 4
        args.compile_dtypes = "fp32"
    name = args.name or ("gpu_smoke" if args.smoke else "gpu")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU found)"
    print(f"device: {device_name}", flush=True)

    started = time.time()
    base = build_smoke_model() if args.smoke else build_model("mlp")
    models: dict[str, Any] = {}
    for dtype_name in [d for d in args.dtypes.split(",") if d]:
        if dtype_name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {dtype_name!r}; choose from {', '.join(DTYPES)}")
        copy = base if dtype_name == "fp32" else None
        if copy is None:
            copy = (build_smoke_model() if args.smoke else build_model("mlp")).to(DTYPES[dtype_name])
        models[dtype_name] = copy.to(device).eval()
    if "fp32" not in models:
        raise SystemExit("--dtypes must include fp32 (the agreement part compares against it)")

    parts_run = [p for p in args.parts.split(",") if p and (p != "compiled" or args.compile)]
    functions = {
        "throughput": part_throughput,
        "cpu_agreement": part_agreement,
        "coco_beam5": part_coco,
        "compiled": part_compiled,
    }
    parts: dict[str, Any] = {}
    for part in parts_run:
        print(f"\n== {part}", flush=True)
        t0 = time.time()
        try:
            parts[part] = functions[part](models, device, args)
        except Exception as err:  # one failing part must not lose the others' numbers
            traceback.print_exc()
            parts[part] = {"error": f"{type(err).__name__}: {err}"}
        print(f"   ({time.time() - t0:.0f} s)", flush=True)

    training = None
    if args.training_json and Path(args.training_json).exists():
        training = json.loads(Path(args.training_json).read_text())
    elif args.training_json:
        training = {"error": f"{args.training_json} was not written (the training run failed; see its log)"}
    result = {
        "device": str(device),
        "device_name": device_name,
        "cuda": torch.version.cuda,
        "machine": cpu_info(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": args.smoke,
        "args": vars(args),
        "parts": parts,
        "training": training,
        "wall_seconds": time.time() - started,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}", flush=True)
    failed = [p for p, v in parts.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
