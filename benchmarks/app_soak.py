"""Soak test of ``clipcap app``: many concurrent API clients, some corrupt files, latency and server memory.

Starts the server in a subprocess (``clipcap app --model DIR``, or with ``--bare`` a bare Gradio app with the
same API interface and queue settings whose handler opens each image and returns a fixed caption, no model:
the Gradio baseline), then ``--clients`` threads, each with its own ``gradio_client.Client``, send
``--requests`` calls to the ``caption`` endpoint between them. ``--corrupt`` of the requests carry a corrupt
file (truncated PNG, random bytes, empty file) and must be refused with the readable error; every other
request must get a caption. The server's resident memory (VmRSS) is read at start and after every
``--sample_every`` answered requests.

Reported: requests, clients, throughput (answered requests/s), latency p50 / p95 / max of the good requests,
errors by kind, RSS over time, and the RSS growth from the sample after ``--sample_every`` requests to the
last one (the target: within 10%).

    python benchmarks/app_soak.py --model /work/demo_base/model --images /work/demo_base/data/test
    python benchmarks/app_soak.py --bare --images DIR            # the same load on a bare Gradio app
    python benchmarks/app_soak.py --tiny --requests 60 --clients 4   # a tiny random model (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


# --------------------------------------------------------------------------------------------- servers


def serve_bare(port: int, max_batch_size: int, queue_size: int) -> None:
    """A bare Gradio app with the ``caption`` endpoint's interface (hidden file in, text out, batched, a validator
    that opens the image, one at a time) and no model: the handler opens each image and returns a fixed caption."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from PIL import Image

    from modeling_clipcap.app import _fix_batched_validators

    _fix_batched_validators()

    def validate(images: list[Any]) -> tuple[list[Any]]:
        verdicts = []
        for image in images:
            try:
                with Image.open(image) as im:
                    im.convert("RGB")
                verdicts.append(gr.validate(True, ""))
            except Exception as err:
                verdicts.append(gr.validate(False, f"{Path(image).name}: cannot read the image ({err})."))
        return (verdicts,)

    def caption(images: list[Any]) -> tuple[list[str]]:
        out = []
        for image in images:
            with Image.open(image) as im:
                im.convert("RGB")
            out.append("a small orange square.")
        return (out,)

    with gr.Blocks(analytics_enabled=False) as demo:
        api_image = gr.File(visible=False, file_count="single", file_types=["image"])
        api_caption = gr.Textbox(visible=False)
        gr.Button(visible=False).click(
            caption,
            inputs=[api_image],
            outputs=[api_caption],
            api_name="caption",
            batch=True,
            max_batch_size=max_batch_size,
            validator=validate,
            concurrency_id="model",
            concurrency_limit=1,
        )
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=port, ssr_mode=False, show_error=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: Any, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    if args.bare:
        cmd = [sys.executable, __file__, "--serve_bare", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "modeling_clipcap.cli", "app", "--model", str(args.model)]
        cmd += ["--port", str(port), "--max_batch_size", str(args.max_batch_size)]
        cmd += ["--queue_size", str(args.queue_size)]
    cmd += args.server_args
    print("server:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it answered; see its log")
        try:
            with urllib.request.urlopen(url + "/config", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s")


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (MiB)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(c) for c in found]
    for c in list(out):
        out.extend(children(c))
    return out


# --------------------------------------------------------------------------------------------- inputs


def make_corrupt_files(folder: Path, good: Path) -> list[Path]:
    """Three kinds of corrupt image: truncated PNG, random bytes named .jpg, an empty .png."""
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:120])
    noise = folder / "noise.jpg"
    noise.write_bytes(random.Random(0).randbytes(4096))
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return [truncated, noise, empty]


def make_images(folder: Path, n: int = 64) -> list[Path]:
    """Synthetic PNG images (coloured shapes on noise) when no ``--images`` folder is given."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        array = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
        array[60:160, 60:160] = rng.integers(0, 255, 3, dtype=np.uint8)
        path = folder / f"image_{i:03d}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def tiny_model(folder: Path) -> Path:
    """A tiny random ClipCap model with a tiny tokenizer, saved (for a smoke run)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import build_tiny_processor, build_tiny_tokenizer, tiny_clipcap_config

    from modeling_clipcap import ClipCapForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    model = ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer))).eval()
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(folder)
    build_tiny_processor(tokenizer).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- load


def soak(args: Any, url: str, pid: int, images: list[Path], corrupt: list[Path]) -> dict[str, Any]:
    from gradio_client import Client, handle_file

    lock = threading.Lock()
    state = {"sent": 0, "done": 0}
    results: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = [{"requests": 0, "seconds": 0.0, "rss MiB": rss_mib(pid)}]
    rng = random.Random(1)
    plan = [rng.random() < args.corrupt for _ in range(args.requests)]
    started = time.perf_counter()

    def client_loop(index: int) -> None:
        # a generous read timeout: on a loaded host a request can wait long in the queue (httpx's default is 5 s)
        client = Client(url, verbose=False, download_files=False, httpx_kwargs={"timeout": args.timeout})
        r = random.Random(100 + index)
        while True:
            with lock:
                if state["sent"] >= args.requests:
                    return
                number = state["sent"]
                state["sent"] += 1
            bad = plan[number]
            path = r.choice(corrupt) if bad else r.choice(images)
            t0 = time.perf_counter()
            try:
                out = client.predict(handle_file(str(path)), api_name="/caption")
                outcome, message = "caption", str(out)
            except Exception as err:  # gradio_client raises AppError with the server's message
                outcome, message = "error", f"{type(err).__name__}: {err}"
            latency = time.perf_counter() - t0
            with lock:
                results.append(
                    {"corrupt": bad, "file": path.name, "outcome": outcome, "message": message, "s": latency}
                )
                state["done"] += 1
                done = state["done"]
                if done % args.sample_every == 0 or done == args.requests:
                    samples.append(
                        {"requests": done, "seconds": time.perf_counter() - started, "rss MiB": rss_mib(pid)}
                    )
                    print(f"  {done} requests, {samples[-1]['seconds']:.0f} s, RSS {samples[-1]['rss MiB']:.0f} MiB",
                          flush=True)  # fmt: skip

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    good = [r for r in results if not r["corrupt"]]
    bad = [r for r in results if r["corrupt"]]
    latencies = sorted(r["s"] for r in good if r["outcome"] == "caption")

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    refused_readably = [
        r for r in bad if r["outcome"] == "error" and any(f.name in r["message"] for f in corrupt)
    ]
    first = next((s for s in samples if s["requests"] >= args.sample_every), samples[-1])
    return {
        "requests": len(results),
        "clients": args.clients,
        "wall s": wall,
        "requests/s": len(results) / wall,
        "captions/s": sum(r["outcome"] == "caption" for r in good) / wall,
        "latency p50 s": pct(0.50),
        "latency p95 s": pct(0.95),
        "latency max s": latencies[-1] if latencies else None,
        "good requests": len(good),
        "good requests captioned": sum(r["outcome"] == "caption" for r in good),
        "good requests failed": [r for r in good if r["outcome"] != "caption"][:10],
        "corrupt requests": len(bad),
        "corrupt refused with a message naming the file": len(refused_readably),
        "corrupt other outcome": [r for r in bad if r not in refused_readably][:10],
        "corrupt error example": bad[0]["message"] if bad else None,
        "rss samples": samples,
        "rss start MiB": samples[0]["rss MiB"],
        f"rss after {first['requests']} MiB": first["rss MiB"],
        "rss last MiB": samples[-1]["rss MiB"],
        "rss growth after first sample %": 100 * (samples[-1]["rss MiB"] / first["rss MiB"] - 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a saved ClipCap model folder")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random model (smoke run)")
    parser.add_argument("--bare", action="store_true", help="serve a bare Gradio app with the same interface")
    parser.add_argument("--images", default=None, help="folder of images to send (default: synthetic PNGs)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--corrupt", type=float, default=0.1, help="fraction of requests with a corrupt file")
    parser.add_argument(
        "--sample_every", type=int, default=300, help="read the server's RSS every N requests"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="client read timeout (s)")
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--queue_size", type=int, default=64)
    parser.add_argument("--name", default="app_soak", help="JSON file name under benchmarks/results/")
    parser.add_argument("--out_dir", default=str(BENCH_DIR / "results"))
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--serve_bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "server_args", nargs="*", help="extra arguments for the server (after --), e.g. -- --dtype bfloat16"
    )
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.port, args.max_batch_size, args.queue_size)
        return 0
    if sum(bool(x) for x in (args.model, args.tiny, args.bare)) != 1:
        parser.error("give exactly one of --model DIR, --tiny or --bare")
    work = Path(tempfile.mkdtemp(prefix="clipcap-soak-"))
    if args.tiny:
        args.model = str(tiny_model(work / "model"))
    if args.images:
        images = sorted(
            p for p in Path(args.images).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"}
        )
        if not images:
            parser.error(f"--images {args.images}: no .png / .jpg files")
    else:
        images = make_images(work / "images")
    corrupt = make_corrupt_files(work / "corrupt", images[0])
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    print(f"server log: {log}", flush=True)
    proc = start_server(args, port, log)
    try:
        wait_ready(url, proc)
        result = soak(args, url, proc.pid, images, corrupt)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {
        "server": "bare Gradio app" if args.bare else f"clipcap app --model {args.model}",
        "server_args": args.server_args,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_1min_at_end": os.getloadavg()[0],
        **result,
    }
    path = Path(args.out_dir) / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    summary = {k: v for k, v in result.items() if k not in ("rss samples", "corrupt other outcome")}
    print(json.dumps(summary, indent=2, default=str))
    print(
        "RSS (requests -> MiB):",
        ", ".join(f"{s['requests']}: {s['rss MiB']:.0f}" for s in result["rss samples"]),
    )
    print(f"wrote {path}")
    ok = result["good requests captioned"] == result["good requests"] and not result["corrupt other outcome"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
