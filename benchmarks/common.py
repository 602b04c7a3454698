"""Shared helpers of the benchmarks: real-size models with random weights, timers, memory, FLOP limits, output.

The benchmarks are not tests: they build the paper's architectures at full size (CLIP ViT-B/32 vision tower
with projection, GPT-2 124M, MLP mapper K=10 or transformer mapper K=40) from configs with random weights,
because no pretrained weights exist offline. Throughput does not depend on the weights' values as long as
every variant does the same work; captions are forced to a fixed length for that reason.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MODEL_CACHE = Path(os.environ.get("CLIPCAP_BENCH_CACHE", "/tmp/clipcap-bench-models"))

CLIP_GFLOPS_PER_IMAGE = 8.8  # CLIP ViT-B/32 image tower, 224x224 (forward)
CAPTION_TOKENS = 20  # every captioning variant generates exactly this many tokens
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>

MAPPERS: dict[str, dict[str, Any]] = {
    "mlp": {"mapping_type": "mlp", "prefix_length": 10},
    "transformer": {
        "mapping_type": "transformer",
        "prefix_length": 40,
        "clip_length": 40,
        "mapping_num_layers": 8,
    },
}


# --------------------------------------------------------------------------------------------- models


def build_config(mapping: str = "mlp", freeze_language_model: bool = False) -> Any:
    """Real-size ClipCap config: CLIP ViT-B/32 (projection 512), GPT-2 small, the paper's mapper."""
    from transformers import CLIPVisionConfig, GPT2Config

    from modeling_clipcap import ClipCapConfig

    if mapping not in MAPPERS:
        raise ValueError(f"mapping must be one of {sorted(MAPPERS)}, got {mapping!r}")
    return ClipCapConfig(
        vision_config=CLIPVisionConfig(projection_dim=512),
        text_config=GPT2Config(),
        freeze_language_model=freeze_language_model,
        **MAPPERS[mapping],
    )


def build_model(
    mapping: str = "mlp", dtype: torch.dtype = torch.float32, freeze_language_model: bool = False
) -> Any:
    """A real-size ClipCap model with random weights, in eval mode.

    The random model is built once per mapper and saved (safetensors) under ``MODEL_CACHE`` (a temporary
    directory, never the repository); later runs load it, which takes seconds instead of a re-initialisation.
    """
    from modeling_clipcap import ClipCapForConditionalGeneration

    path = MODEL_CACHE / f"random-{mapping}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = ClipCapForConditionalGeneration(build_config(mapping))
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        del model
    model = ClipCapForConditionalGeneration.from_pretrained(
        path, dtype=dtype, freeze_language_model=freeze_language_model
    )
    # from_pretrained (transformers 5.23) hands back every parameter with requires_grad=True, whatever the
    # config freezes; re-apply the config's freezing (reported to the model's owner).
    model._apply_freezing()
    return model.eval()


def count_gpt2_gflops_per_token(model: Any) -> tuple[float, float]:
    """(body, head) forward GFLOPs of one GPT-2 position: 2 x matmul parameters (attention scores ignored)."""
    cfg = model.config.text_config
    e, n_layer = cfg.n_embd, cfg.n_layer
    inner = cfg.n_inner or 4 * e
    body = 2 * n_layer * (4 * e * e + 2 * e * inner) / 1e9
    head = 2 * e * cfg.vocab_size / 1e9
    return body, head


def mapper_gflops(model: Any) -> float:
    """Forward GFLOPs of the mapping network for one image (matmuls only)."""
    cfg = model.config
    e, d, k = cfg.hidden_size, cfg.image_embed_dim, cfg.prefix_length
    if cfg.mapping_type == "mlp":
        hidden = cfg.mapping_hidden_size or e * k // 2
        return 2 * (d * hidden + hidden * e * k) / 1e9
    tokens = cfg.clip_length + k
    inner = int(e * cfg.mapping_mlp_ratio)
    per_layer = tokens * (4 * e * e + 2 * e * inner) + 2 * tokens * tokens * e
    return 2 * (d * cfg.clip_length * e + cfg.mapping_num_layers * per_layer) / 1e9


def necessary_caption_gflops(model: Any, num_beams: int, with_clip: bool = True) -> float:
    """The work a captioner cannot avoid, per image: the CLIP tower, the mapper and GPT-2 over the prefix
    once, then ``num_beams`` x ``CAPTION_TOKENS`` generated positions (body + output layer)."""
    body, head = count_gpt2_gflops_per_token(model)
    work = mapper_gflops(model) + model.config.prefix_length * body
    work += num_beams * CAPTION_TOKENS * (body + head)
    return work + (CLIP_GFLOPS_PER_IMAGE if with_clip else 0.0)


# --------------------------------------------------------------------------------------------- clock

#: the clock every timer here reads: wall time by default; ``set_clock("process")`` switches to this process's
#: CPU time, which a shared, loaded host does not inflate by time-slicing (valid at 1 thread only: at n threads
#: the CPU time of all n threads adds up)
_CLOCK: dict[str, Callable[[], float]] = {"now": time.perf_counter}
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def set_clock(name: str) -> None:
    """Time with ``"wall"`` (``perf_counter``) or ``"process"`` (``process_time``: this process's CPU time)."""
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {name!r}")
    _CLOCK["now"] = CLOCKS[name]


def now() -> float:
    """The current reading of the selected clock (seconds)."""
    return _CLOCK["now"]()


# --------------------------------------------------------------------------------------------- machine


def set_threads(n: int) -> None:
    """Intra-op threads for torch (the benchmarks report 1 and 2)."""
    torch.set_num_threads(n)


def cpu_info() -> dict[str, Any]:
    """CPU model, vector extensions that decide bf16 speed, core count, load average (``clipcap env``'s
    detection plus what a benchmark needs to judge its numbers)."""
    from modeling_clipcap.environment import cpu_info as library_cpu_info

    return {
        **library_cpu_info(),
        "loadavg_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def matmul_gflops(dtype: torch.dtype, sizes: Sequence[int] = (512, 1024), seconds: float = 0.6) -> float:
    """Best measured square-matmul rate (GFLOP/s) at the current thread count: the machine's FLOP limit."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b
        runs, start = 0, now()
        while True:
            a @ b
            runs += 1
            elapsed = now() - start
            if elapsed >= seconds:
                break
        best = max(best, 2 * n**3 * runs / elapsed / 1e9)
    return best


def onednn_matmul_gflops(
    dtype: torch.dtype, sizes: Sequence[int] = (512, 1024), seconds: float = 0.6
) -> float | None:
    """Best square-matmul rate (GFLOP/s) through oneDNN with a prepacked weight (what
    ``modeling_clipcap.cpu_linear`` runs), or None where this torch has no oneDNN linear ops. On AMD CPUs MKL
    (``torch.matmul`` in float32) uses AVX2 kernels, oneDNN the CPU's widest units: its limit is the higher one."""
    from modeling_clipcap.compat import onednn_linear_ops

    ops = onednn_linear_ops()
    if ops is None:
        return None
    pack, linear = ops
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        packed = pack(torch.randn(n, n).to(dtype), n)
        linear(a, packed, None)
        runs, start = 0, now()
        while True:
            linear(a, packed, None)
            runs += 1
            elapsed = now() - start
            if elapsed >= seconds:
                break
        best = max(best, 2 * n**3 * runs / elapsed / 1e9)
    return best


def bf16_is_fast(fp32_gflops: float, bf16_gflops: float) -> bool:
    """bf16 pays only where the CPU has native bf16 matrix units (AMX / AVX512-BF16)."""
    return bf16_gflops >= fp32_gflops


# --------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> float | None:
    try:
        m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return float(m.group(1)) if m else None


def rss_mb() -> float | None:
    """Current resident set size (MiB), or None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mb() -> float | None:
    """Peak resident set size since the last ``reset_peak_rss`` (MiB)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- timing


def measure(fn: Callable[[], Any], repeats: int = 1, statistic: str = "best") -> dict[str, Any]:
    """Run ``fn`` ``repeats`` times: wall time (s) by ``statistic`` ("best" or "median") and every time,
    peak RSS (MiB) and peak growth over the start."""
    import gc
    import statistics as stats

    if statistic not in ("best", "median"):
        raise ValueError(f"statistic must be 'best' or 'median', got {statistic!r}")
    gc.collect()
    start_rss = rss_mb()
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        times.append(now() - t0)
    peak = peak_rss_mb()
    return {
        "seconds": min(times) if statistic == "best" else stats.median(times),
        "times": times,
        "peak_rss_mb": peak,
        "peak_growth_mb": None if peak is None or start_rss is None else peak - start_rss,
    }


def add_allocator_argument(parser: Any) -> None:
    """``--no-malloc-tuning``: keep glibc's default allocator settings (see ``modeling_clipcap.cpu_tuning``)."""
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's default malloc settings (default: tune_cpu_allocator(), as the clipcap CLI does; "
        "applies to the baseline and ours alike)",
    )


def apply_allocator_argument(args: Any) -> dict[str, Any] | None:
    """Apply the allocator tuning unless ``--no-malloc-tuning``; returns what was applied (for the JSON)."""
    if getattr(args, "no_malloc_tuning", False):
        return None
    from modeling_clipcap.cpu_tuning import tune_cpu_allocator

    return tune_cpu_allocator()


# --------------------------------------------------------------------------------------------- output


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Render ``rows`` as a Markdown table (also printed), columns in the given order."""
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` (plus machine info) to ``benchmarks/results/<name>.json``; returns the path."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": cpu_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}", flush=True)
    return path


def parse_int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] with a clear error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"expected positive integers, got {text!r}")
    return values


def make_pixel_values(batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, 224, 224) normalised-looking random images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g)
