"""SIGKILL a real ``training/train.py`` process at four points and resume: same weights as one run.

The run under test is killed (``SIGKILL``: no clean-up, no ``finally``) four times, each time resumed
with ``--resume_from_checkpoint latest`` in the same output folder:

1. from outside, at a random point in the loop after the first checkpoint;
2. from inside, **while a checkpoint is being written**: the first file of ``checkpoints/.tmp-step_6``
   is half written, then the process kills itself;
3. from inside, after ``checkpoints/.tmp-step_8`` is complete but before it is renamed into place;
4. from outside again, later in the loop.

The fifth launch finishes. Its final weights and every step's loss must equal an uninterrupted run's
(max abs difference <= 1e-6). Training steps are slowed by a sleep in ``forward`` (numerics unchanged)
so that the outside kills land in the middle of the run.

The in-process kills come from a small driver that imports ``train`` and wraps ``torch.save`` /
``os.replace``; train.py itself has no test hooks.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, subprocess_env, write_tiny_preset
from safetensors.torch import load_file

TRAINING_DIR = REPO_ROOT / "training"

DRIVER = r"""
import io, os, signal, sys, time
sys.path.insert(0, os.environ["TRAINING_DIR"])
import torch
import train
from modeling_clipcap import ClipCapForConditionalGeneration

delay = float(os.environ.get("STEP_DELAY", "0"))
original_forward = ClipCapForConditionalGeneration.forward

def slow_forward(self, *args, **kwargs):
    if self.training and delay:
        time.sleep(delay)
    return original_forward(self, *args, **kwargs)

ClipCapForConditionalGeneration.forward = slow_forward

mode, _, target = os.environ.get("KILL_MODE", "").partition(":")

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "partial_write":  # half of the first file of .tmp-<target>, then SIGKILL
    original_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f".tmp-{target}" in str(f):
            buf = io.BytesIO()
            original_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            print(f"KILLED-WHILE-WRITING {f}", flush=True)
            die()
        return original_save(obj, f, *args, **kwargs)
    torch.save = save
elif mode == "before_rename":  # .tmp-<target> complete, not yet renamed
    original_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(src)) == f".tmp-{target}":
            print(f"KILLED-BEFORE-RENAME {src}", flush=True)
            die()
        return original_replace(src, dst, *args, **kwargs)
    os.replace = replace

train.main(sys.argv[1:])
"""

COMMON = ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2"]
COMMON += ["--max_train_steps", "14", "--checkpointing_steps", "2", "--report_to", "none"]


def _write_preset(folder: Path) -> Path:
    """A tiny preset with dropout on (so RNG state must survive the kills too)."""
    return write_tiny_preset(folder, {"learning_rate": 1e-2, "num_warmup_steps": 2, "max_caption_length": 24})


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(tmp, TRAINING_DIR=str(TRAINING_DIR), **extra)


def _logged_steps(out: Path) -> list[dict]:
    path = out / "train_log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    return [r for r in records if "loss" in r]


def _launch(argv: list[str], env: dict[str, str], kill_after_step: int | None = None, timeout: float = 120):
    """Run the driver; with ``kill_after_step``, SIGKILL it from outside once that step is logged."""
    out = Path(argv[argv.index("--output_dir") + 1])
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed_at = None
    if kill_after_step is not None:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            steps = [r["step"] for r in _logged_steps(out)]
            if steps and steps[-1] >= kill_after_step:
                proc.send_signal(signal.SIGKILL)
                killed_at = steps[-1]
                break
            time.sleep(0.01)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output, killed_at


def _checkpoints(out: Path) -> list[str]:
    from modeling_clipcap import checkpointing

    return [p.name for p in checkpointing.list_checkpoints(out)]


def _last_loss_per_step(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _logged_steps(out)}  # a resumed run re-logs steps: keep the last


@pytest.mark.slow
def test_sigkill_at_four_points_then_resume_gives_the_same_weights(tmp_path):
    sys.path.insert(0, str(TRAINING_DIR))
    import synthetic_data

    synthetic_data.write_to_disk(tmp_path / "data", sizes={"train": 12}, show_progress=False)
    preset = _write_preset(tmp_path / "preset")

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--config", str(preset), "--train_file", str(tmp_path / "data"), "--output_dir", str(out)] + [
            "--embedding_cache_dir",
            str(tmp_path / "cache"),
            *COMMON,
            *extra,
        ]

    env = _env(tmp_path)
    slow = _env(tmp_path, STEP_DELAY="0.15")
    full, killed = tmp_path / "full", tmp_path / "killed"
    status, output, _ = _launch(argv(full), env)
    assert status == 0, output[-4000:]
    resume = ("--resume_from_checkpoint", "latest")
    kills = []

    # 1. outside SIGKILL at a random point after the first checkpoint
    status, output, at = _launch(argv(killed, *resume), slow, kill_after_step=3)
    assert status == -signal.SIGKILL and at is not None, output[-4000:]
    kills.append(("outside", at, _checkpoints(killed)))
    assert _checkpoints(killed) and not (killed / "model.safetensors").exists()

    # 2. SIGKILL while checkpoint step_6 is being written (its first file half written)
    status, output, _ = _launch(argv(killed, *resume), dict(env, KILL_MODE="partial_write:step_6"))
    assert status == -signal.SIGKILL and "KILLED-WHILE-WRITING" in output, output[-4000:]
    tmp6 = killed / "checkpoints" / ".tmp-step_6"
    assert tmp6.is_dir() and "step_6" not in _checkpoints(killed)
    assert _checkpoints(killed)[-1] == "step_4"
    kills.append(("while writing step_6", 6, _checkpoints(killed)))

    # 3. SIGKILL with step_8 fully written to its temporary folder, before the rename
    status, output, _ = _launch(argv(killed, *resume), dict(env, KILL_MODE="before_rename:step_8"))
    assert status == -signal.SIGKILL and "KILLED-BEFORE-RENAME" in output, output[-4000:]
    assert "Resumed from checkpoint" in output and "step_4" in output
    assert (killed / "checkpoints" / ".tmp-step_8" / "training_state.json").is_file()
    assert _checkpoints(killed)[-1] == "step_6"
    kills.append(("before renaming step_8", 8, _checkpoints(killed)))

    # 4. outside SIGKILL again, later
    status, output, at = _launch(argv(killed, *resume), slow, kill_after_step=11)
    assert status == -signal.SIGKILL and at is not None, output[-4000:]
    kills.append(("outside", at, _checkpoints(killed)))

    # 5. resume to the end
    status, output, _ = _launch(argv(killed, *resume), env)
    assert status == 0, output[-4000:]
    assert "Resumed from checkpoint" in output

    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(json.dumps({"kills": kills, "max_abs_weight_diff": diff}))
    assert diff <= 1e-6, diff
    full_losses, killed_losses = _last_loss_per_step(full), _last_loss_per_step(killed)
    assert sorted(killed_losses) == list(range(1, 15)) == sorted(full_losses)
    assert all(abs(full_losses[s] - killed_losses[s]) <= 1e-6 for s in full_losses), (
        full_losses,
        killed_losses,
    )
    # nothing half-written is left, and no checkpoint file needs a code-running unpickle
    leftovers = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    for ckpt in (killed / "checkpoints").iterdir():
        assert not list(ckpt.glob("custom_checkpoint_*")), ckpt


CACHE_DRIVER = r"""
import os, signal, sys
import pyarrow.parquet as pq
from modeling_clipcap import ClipCapForConditionalGeneration, ClipCapProcessor
from modeling_clipcap.embedding_cache import build_embedding_cache

model_dir, cache_dir, *paths = sys.argv[1:]
original = pq.write_table

def write_then_die(table, where, *args, **kwargs):
    original(table, where, *args, **kwargs)  # the Parquet file is on disk, cache_info.json and the renames are not
    print("KILLED-WHILE-CACHING", where, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = write_then_die
model = ClipCapForConditionalGeneration.from_pretrained(model_dir)
processor = ClipCapProcessor.from_pretrained(model_dir)
build_embedding_cache(model, processor.image_processor, paths, cache_dir=cache_dir, show_progress=False)
"""


def test_sigkill_while_writing_the_embedding_cache_is_not_trusted_later(tmp_path, tiny_model, tiny_processor):
    import numpy as np
    import torch
    from PIL import Image

    from modeling_clipcap.embedding_cache import build_embedding_cache, encode_images

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(str(path))
    cache_dir = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", CACHE_DRIVER, str(model_dir), str(cache_dir), *paths],
        cwd=REPO_ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL and "KILLED-WHILE-CACHING" in proc.stdout, proc.stderr[-3000:]
    assert not [p for p in cache_dir.iterdir() if not p.name.startswith(".")]  # only the temporary folder
    cache = build_embedding_cache(
        tiny_model, tiny_processor.image_processor, paths, cache_dir=cache_dir, show_progress=False
    )
    assert cache.num_encoded == len(paths)  # the half-written cache was not trusted
    direct, _, _ = encode_images(tiny_model, tiny_processor.image_processor, paths, show_progress=False)
    torch.testing.assert_close(cache.embeddings(), direct)
    again = build_embedding_cache(
        tiny_model, tiny_processor.image_processor, paths, cache_dir=cache_dir, show_progress=False
    )
    assert again.num_encoded == 0  # control: a complete cache of the same model and files is reused
