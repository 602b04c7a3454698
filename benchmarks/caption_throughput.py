"""Captioning throughput: this package's batched, KV-cached ``generate`` vs the original ClipCap decoding.

Real-size model with random weights (CLIP ViT-B/32 + projection, GPT-2 124M, MLP mapper K=10; optionally
the transformer mapper K=40). Every variant generates exactly 20 tokens per caption
(``min_new_tokens = max_new_tokens = 20``) so all do the same work.

Baseline ("original"): the algorithm of the original repository's ``generate2`` (greedy) and
``generate_beam`` (beam search), re-written here: one image per call (CLIP at batch 1), and at every step a
full GPT-2 forward over the whole growing sequence with the output layer on every position, no KV cache;
beam search expands the beams after the first step and ranks by length-normalised scores.

Ours: ``model.generate(pixel_values=batch, ...)``: batched CLIP, prefix computed once per image, one GPT-2
pass over the prefix per image shared by its beams, KV cache, output layer only where a token is chosen.

Reported per row: images/s end to end (CLIP included) and decode-only (CLIP time measured separately and
subtracted), the speed-up over the baseline measured in the same run at the same thread count, the
"necessary" GFLOP/s (CLIP + mapper + GPT-2 over the prefix once per image + beams x 20 generated tokens)
and its fraction of the measured matmul limit of the dtype, and the peak RSS.

    python benchmarks/caption_throughput.py            # full run (a few minutes per thread count)
    python benchmarks/caption_throughput.py --quick    # batch 1 and 8, one baseline image
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CAPTION_TOKENS,
    PAD_TOKEN_ID,
    add_allocator_argument,
    apply_allocator_argument,
    bf16_is_fast,
    build_model,
    make_pixel_values,
    matmul_gflops,
    measure,
    necessary_caption_gflops,
    onednn_matmul_gflops,
    parse_int_list,
    print_table,
    set_clock,
    set_threads,
    write_json,
)

# --------------------------------------------------------------------------------------------- baseline


@torch.no_grad()
def original_greedy(model: Any, image_embeds: torch.Tensor, top_p: float = 0.8) -> torch.Tensor:
    """Greedy decoding as the original ``generate2``: (1, D) -> (1, 20) token ids.

    Each step runs GPT-2 over the whole sequence so far (no cache), keeps the last position's logits, applies
    the original's nucleus filter (sort + cumulative softmax, which cannot change the arg-max) and takes the
    arg-max. Stopping at "." is left out so that every caption has 20 tokens.
    """
    prefix, _ = model.get_prefix(image_embeds=image_embeds)  # (1, K, E)
    gpt = model.language_model
    embeds, tokens = prefix, []
    for _ in range(CAPTION_TOKENS):
        logits = gpt(inputs_embeds=embeds, use_cache=False).logits[:, -1, :]  # full logits (1, S, V) computed
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits[:, sorted_idx[drop]] = float("-inf")
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        tokens.append(token)
        embeds = torch.cat([embeds, gpt.transformer.wte(token)], dim=1)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def original_beam(model: Any, image_embeds: torch.Tensor, num_beams: int = 5) -> torch.Tensor:
    """Beam search as the original ``generate_beam``: (1, D) -> (20,) token ids of the best beam.

    First step on the single prefix, then ``num_beams`` sequences re-run in full at every step; candidates are
    ranked by score / length (length-normalised), beams and their embeddings are gathered from their parents.
    """
    prefix, _ = model.get_prefix(image_embeds=image_embeds)  # (1, K, E)
    gpt = model.language_model
    wte = gpt.transformer.wte
    embeds, scores, tokens = prefix, None, None
    lengths = torch.ones(num_beams)
    for _ in range(CAPTION_TOKENS):
        logits = gpt(inputs_embeds=embeds, use_cache=False).logits[:, -1, :]
        log_probs = logits.softmax(dim=-1).log()
        if scores is None:
            scores, next_tokens = log_probs.topk(num_beams, dim=-1)  # (1, beams)
            scores, next_tokens = scores.squeeze(0), next_tokens.transpose(0, 1)  # (beams,), (beams, 1)
            embeds = embeds.expand(num_beams, -1, -1)
            tokens = next_tokens
        else:
            vocab = log_probs.shape[-1]
            lengths = lengths + 1
            averaged = (scores[:, None] + log_probs) / lengths[:, None]
            averaged, flat = averaged.view(-1).topk(num_beams)
            parent = torch.div(flat, vocab, rounding_mode="floor")
            next_tokens = (flat % vocab).unsqueeze(1)
            lengths = lengths[parent]
            tokens = torch.cat([tokens[parent], next_tokens], dim=1)
            embeds = embeds[parent]
            scores = averaged * lengths
        embeds = torch.cat([embeds, wte(next_tokens)], dim=1)
    best = (scores / lengths).argmax()
    return tokens[best]


def run_original(model: Any, pixel_values: torch.Tensor, num_beams: int) -> list[torch.Tensor]:
    """The original pipeline: per image, CLIP at batch 1, then its decoder."""
    out = []
    for i in range(pixel_values.shape[0]):
        with torch.no_grad():
            embeds = model.get_image_embeddings(pixel_values[i : i + 1]).pooler_output
        if num_beams == 1:
            out.append(original_greedy(model, embeds))
        else:
            out.append(original_beam(model, embeds, num_beams))
    return out


def run_clip_batch1(model: Any, pixel_values: torch.Tensor) -> None:
    with torch.no_grad():
        for i in range(pixel_values.shape[0]):
            _ = model.get_image_embeddings(pixel_values[i : i + 1]).pooler_output


# --------------------------------------------------------------------------------------------- ours


def run_ours(model: Any, pixel_values: torch.Tensor, num_beams: int, **options: Any) -> torch.Tensor:
    return model.generate(
        pixel_values=pixel_values,
        num_beams=num_beams,
        do_sample=False,
        min_new_tokens=CAPTION_TOKENS,
        max_new_tokens=CAPTION_TOKENS,
        pad_token_id=PAD_TOKEN_ID,
        **options,
    )


def run_ours_compiled(model: Any, pixel_values: torch.Tensor, num_beams: int) -> torch.Tensor:
    """``generate`` with a static cache and the decoding step compiled by ``torch.compile``
    (``modeling_clipcap.compiled_decoding``: transformers' ``CompileConfig``, Inductor freezing on CPU). The
    first call per shape compiles (tens of seconds); the benchmark warms it up before timing."""
    from modeling_clipcap.compiled_decoding import compiled_decoding_kwargs

    return run_ours(model, pixel_values, num_beams, **compiled_decoding_kwargs(model))


def run_clip(model: Any, pixel_values: torch.Tensor) -> None:
    with torch.no_grad():
        model.get_image_embeddings(pixel_values)


class _NoSharedPrefill:
    """Context manager: ``generate`` without the shared beam prefill (each beam prefills the prefix itself)."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        self.model._shared_prefill_expand_size = lambda kwargs: 1

    def __exit__(self, *exc: Any) -> None:
        del self.model._shared_prefill_expand_size


class _ModelAttribute:
    """Context manager: set an attribute of the model instance for one row (ablations)."""

    def __init__(self, model: Any, name: str, value: Any):
        self.model, self.name, self.value = model, name, value

    def __enter__(self) -> None:
        setattr(self.model, self.name, self.value)

    def __exit__(self, *exc: Any) -> None:
        delattr(self.model, self.name)  # back to the class default


class _OneDnnLinear:
    """Context manager: the model's linear layers through prepacked oneDNN (``modeling_clipcap.cpu_linear``)."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        from modeling_clipcap.cpu_linear import use_onednn_linear

        if not use_onednn_linear(self.model):
            raise SystemExit("--onednn: this torch build has no oneDNN linear ops")
        run_ours(self.model, make_pixel_values(2), 1)  # packs the weights (once), outside the timing

    def __exit__(self, *exc: Any) -> None:
        from modeling_clipcap.cpu_linear import restore_linear

        restore_linear(self.model)


#: ablation rows at the largest batch: label -> context manager factory (each undoes one optimisation)
ABLATIONS: dict[str, Any] = {
    "ours, stock EOS masking": lambda m: _ModelAttribute(m, "fast_eos_suppression", False),
    "ours, plain output layer": lambda m: _ModelAttribute(m, "cpu_output_layer_block", None),
    "ours, no shared prefill": _NoSharedPrefill,
}


# --------------------------------------------------------------------------------------------- driver


def bench_row(
    model: Any,
    label: str,
    dtype_name: str,
    mode: str,
    num_beams: int,
    batch: int,
    run: Any,
    clip_run: Any,
    limit: float,
    threads: int,
    mapper: str,
    repeats: int = 3,
) -> dict[str, Any]:
    """One table row. Times are medians: ours over ``repeats`` calls on the whole batch; the original-style
    loop (``label == "original"``) over its ``batch`` images, one call per image (each image is the same
    work: 20 tokens), so both sides are a median of several equal units of work."""
    if label == "original":
        images = [make_pixel_values(1, seed=i) for i in range(batch)]
        queue = list(images)
        total = measure(lambda: run(model, queue.pop(0), num_beams), repeats=batch, statistic="median")
        queue = list(images)
        clip = measure(lambda: clip_run(model, queue.pop(0)), repeats=batch, statistic="median")
        unit_images = 1
    else:
        pixel_values = make_pixel_values(batch, seed=batch)
        outputs: list[Any] = []
        total = measure(
            lambda: outputs.append(run(model, pixel_values, num_beams)), repeats=repeats, statistic="median"
        )
        clip = measure(lambda: clip_run(model, pixel_values), repeats=repeats, statistic="median")
        unit_images = batch
    work = necessary_caption_gflops(model, num_beams) * unit_images
    decode_s = max(total["seconds"] - clip["seconds"], 1e-9)
    row = {
        "threads": threads,
        "mapper": mapper,
        "dtype": dtype_name,
        "mode": mode,
        "method": label,
        "batch": batch if label != "original" else 1,
        "images": batch if label == "original" else batch * repeats,
        "seconds": total["seconds"],
        "times": total["times"],
        "img/s": unit_images / total["seconds"],
        "decode img/s": unit_images / decode_s,
        "clip s": clip["seconds"],
        "GFLOP/s": work / total["seconds"],
        "% limit": 100 * work / total["seconds"] / limit,
        "peak MiB": total["peak_rss_mb"],
        "growth MiB": total["peak_growth_mb"],
    }
    if label != "original":
        row["_tokens"] = outputs[-1]  # (batch, tokens) of the last call: agreement between rows
    print(
        f"  [{threads}t {mapper} {dtype_name} {mode} {label} b{row['batch']}] "
        f"{row['img/s']:.3f} img/s ({total['seconds']:.1f}s), {row['% limit']:.0f}% of limit",
        flush=True,
    )
    return row


def agreement(row: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """``row`` with the fraction of its captions identical, token for token, to ``reference``'s (same images)."""
    if reference is not None and "_tokens" in row and "_tokens" in reference:
        a, b = row["_tokens"], reference["_tokens"]
        row["same captions"] = float((a == b).all(dim=1).float().mean()) if a.shape == b.shape else 0.0
    return row


def against(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its speed-ups over the original-style ``base`` row of the same run (total and decode)."""
    row["speedup"] = row["img/s"] / base["img/s"]
    row["decode speedup"] = row["decode img/s"] / base["decode img/s"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts to run, e.g. 1,2")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes of the batched generate")
    parser.add_argument(
        "--baseline-images",
        type=int,
        default=4,
        help="images the original-style loop captions (one call each; the median call is reported)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="calls per batched row (the median call is reported)"
    )
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument(
        "--mappers", default="mlp,transformer", help="mlp (all batches), transformer (largest batch only)"
    )
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 rows: auto = only where bf16 matmuls are faster than fp32 on this CPU",
    )
    parser.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the ablation rows (largest batch with one optimisation undone: stock EOS masking, "
        "plain output layer, no shared prefill)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add a greedy row at the largest batch with torch.compile + static cache (compiles first)",
    )
    parser.add_argument(
        "--onednn",
        action="store_true",
        help="add rows at the largest batch with every linear layer through prepacked oneDNN "
        "(modeling_clipcap.cpu_linear), fp32 and bf16, with their caption agreement",
    )
    parser.add_argument(
        "--bf16-attention",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="attention of the bf16 models' tower and LM (eager was faster in bf16 on CPU for these small shapes)",
    )
    add_allocator_argument(parser)
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or this process's CPU time (for a loaded host; 1 thread only), for every row and limit",
    )
    parser.add_argument(
        "--quick", action="store_true", help="batches 1,8; 1 baseline image; mlp only; 1 thread"
    )
    parser.add_argument(
        "--name", default="caption_throughput", help="JSON file name under benchmarks/results/"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.baseline_images, args.mappers, args.threads = "1,8", 1, "mlp", "1"
        args.repeats = 1
        args.name = args.name + "_quick" if args.name == "caption_throughput" else args.name
    thread_counts = parse_int_list(args.threads)
    if args.clock == "process" and thread_counts != [1]:
        raise SystemExit("--clock process adds up the CPU time of all threads: use it with --threads 1")
    set_clock(args.clock)
    batches = parse_int_list(args.batches)
    mappers = [m for m in args.mappers.split(",") if m]
    modes = [("greedy", 1), (f"beam{args.beams}", args.beams)]

    started = time.time()
    allocator = apply_allocator_argument(args)
    print(f"allocator tuning: {allocator or 'off (glibc defaults)'}")
    models = {m: build_model(m) for m in mappers}
    rows: list[dict[str, Any]] = []
    limits: dict[str, Any] = {}
    notes: list[str] = []
    bf16_models: dict[str, Any] = {}
    for threads in thread_counts:
        set_threads(threads)
        fp32_limit = matmul_gflops(torch.float32)
        bf16_matmul = matmul_gflops(torch.bfloat16, sizes=(256, 512, 1024), seconds=0.3)
        fp32_onednn_limit = onednn_matmul_gflops(torch.float32) if args.onednn else None
        bf16_onednn = onednn_matmul_gflops(torch.bfloat16, seconds=0.3) if args.onednn else None
        bf16_limit = max(bf16_matmul, bf16_onednn or 0.0)  # the higher of torch.matmul and packed oneDNN
        limits[str(threads)] = {
            "fp32_gflops": fp32_limit,
            "fp32_onednn_gflops": fp32_onednn_limit,
            "bf16_gflops": bf16_limit,
            "bf16_matmul_gflops": bf16_matmul,
            "bf16_onednn_gflops": bf16_onednn,
        }
        print(
            f"\n{threads} thread(s): matmul fp32 {fp32_limit:.1f} GFLOP/s (oneDNN packed: {fp32_onednn_limit}), "
            f"bf16 {bf16_limit:.1f} GFLOP/s (torch.matmul {bf16_matmul:.1f}, oneDNN packed {bf16_onednn})"
        )
        use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and bf16_is_fast(fp32_limit, bf16_limit))
        if args.bf16 == "auto" and not use_bf16:
            notes.append(
                f"{threads} thread(s): bf16 rows skipped: bf16 matmul {bf16_limit:.1f} GFLOP/s < fp32 "
                f"{fp32_limit:.1f} GFLOP/s (no native bf16 on this CPU); use --bf16 on to force."
            )
        for mapper, model in models.items():
            mapper_batches = batches if mapper == "mlp" else [max(batches)]
            # warm-up: allocator, thread pool, first-call overheads
            run_ours(model, make_pixel_values(1), 1)
            original_greedy(model, model.get_image_embeddings(make_pixel_values(1)).pooler_output.detach())
            for mode, beams in modes:
                base = bench_row(
                    model, "original", "fp32", mode, beams, args.baseline_images,
                    run_original, run_clip_batch1, fp32_limit, threads, mapper,
                )  # fmt: skip
                rows.append(base)
                fp32_ours: dict[int, dict[str, Any]] = {}
                for batch in mapper_batches:
                    row = bench_row(
                        model, "ours", "fp32", mode, beams, batch, run_ours, run_clip,
                        fp32_limit, threads, mapper, args.repeats,
                    )  # fmt: skip
                    fp32_ours[batch] = row
                    rows.append(against(row, base))
                if args.onednn:
                    with _OneDnnLinear(model):
                        row = bench_row(
                            model, "ours + oneDNN linear layers", "fp32", mode, beams, max(batches),
                            run_ours, run_clip, fp32_onednn_limit or fp32_limit, threads, mapper, args.repeats,
                        )  # fmt: skip
                    rows.append(agreement(against(row, base), fp32_ours[max(batches)]))
                for ablation, undo in ABLATIONS.items() if not args.no_ablation and mapper == "mlp" else ():
                    if ablation == "ours, no shared prefill" and beams == 1:
                        continue  # greedy has one row per image: nothing to share
                    with undo(model):
                        row = bench_row(
                            model, ablation, "fp32", mode, beams, max(batches),
                            run_ours, run_clip, fp32_limit, threads, mapper, args.repeats,
                        )  # fmt: skip
                    rows.append(against(row, base))
                if args.compile and beams == 1 and mapper == "mlp":
                    started_compile = time.perf_counter()
                    run_ours_compiled(model, make_pixel_values(max(batches), seed=max(batches)), beams)
                    compile_s = time.perf_counter() - started_compile
                    row = bench_row(
                        model, "ours, torch.compile + static cache", "fp32", mode, beams, max(batches),
                        run_ours_compiled, run_clip, fp32_limit, threads, mapper, args.repeats,
                    )  # fmt: skip
                    row["first call s (compiles)"] = compile_s
                    rows.append(against(row, base))
                if use_bf16:
                    if mapper not in bf16_models:
                        bf16_models[mapper] = build_model(mapper, dtype=torch.bfloat16)
                        for part in (bf16_models[mapper].vision_model, bf16_models[mapper].language_model):
                            part.set_attn_implementation(args.bf16_attention)
                    model_bf16 = bf16_models[mapper]
                    for batch in mapper_batches:
                        row = bench_row(
                            model_bf16, "ours", "bf16", mode, beams, batch, run_ours, run_clip,
                            bf16_limit, threads, mapper, args.repeats,
                        )  # fmt: skip
                        rows.append(agreement(against(row, base), fp32_ours.get(batch)))
                    if args.onednn:
                        with _OneDnnLinear(model_bf16):
                            row = bench_row(
                                model_bf16, "ours + oneDNN linear layers", "bf16", mode, beams, max(batches),
                                run_ours, run_clip, bf16_limit, threads, mapper, args.repeats,
                            )  # fmt: skip
                        rows.append(agreement(against(row, base), fp32_ours.get(max(batches))))
    columns = [
        "threads", "mapper", "dtype", "mode", "method", "batch", "img/s", "decode img/s", "speedup",
        "decode speedup", "GFLOP/s", "% limit", "same captions", "peak MiB",
    ]  # fmt: skip
    for row in rows:
        row.pop("_tokens", None)
    print_table(rows, columns, title="Captioning throughput (20 tokens per caption)")
    for threads, lim in limits.items():
        print(
            f"matmul limit at {threads} thread(s): fp32 {lim['fp32_gflops']:.1f}, bf16 {lim['bf16_gflops']:.1f} GFLOP/s"
        )
    for note in notes:
        print("note:", note)
    write_json(
        args.name,
        {
            "args": vars(args),
            "allocator_tuning": allocator,
            "caption_tokens": CAPTION_TOKENS,
            "matmul_limits": limits,
            "rows": rows,
            "notes": notes,
            "wall_seconds": time.time() - started,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
