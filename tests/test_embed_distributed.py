"""``clipcap embed`` under ``accelerate launch`` with 2 CPU processes over gloo.

The ranks split the shards (rank r takes shards r, r + 2, ...) and write into one output folder: together they
must give every good image exactly once, with the embeddings one process computes. One rank failing must fail
the whole launch (exit status not 0) without presenting a half-written file as complete, and without losing
what was already written: the next run of the same command finishes the job.

The shards are those of tests/test_webscale.py (3 tars of 5, 4 and 6 samples; shard 1 holds a broken image).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO_ROOT, subprocess_env
from test_webscale import BROKEN, write_shards

from modeling_clipcap.cli import main as clipcap
from modeling_clipcap.embed import embed_shards, load_image_encoder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_embed(tmp: Path, *args: str) -> tuple[int, str]:
    """``accelerate launch`` (2 CPU processes, gloo) ``-m modeling_clipcap.cli embed ARGS``; (exit status, output)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), "-m", "modeling_clipcap.cli", "embed", *args]
    env = subprocess_env(tmp, ACCELERATE_USE_CPU="true")
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def _embeddings(folder: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """key -> (caption, image_embeds) over every ``*.parquet`` of ``folder``; fails on a key seen twice."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path).to_pydict()
        for key, caption, embeds in zip(table["key"], table["caption"], table["image_embeds"]):
            assert key not in found, f"{key} written twice ({path.name})"
            found[key] = (caption, torch.tensor(embeds))
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tars, a saved tiny ClipCap model, and the outputs of one process over all shards (the reference)."""
    from conftest import build_tiny_processor, build_tiny_tokenizer, tiny_clipcap_config

    from modeling_clipcap import ClipCapForConditionalGeneration

    root = tmp_path_factory.mktemp("embed2")
    keys = write_shards(root / "tars")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer))).save_pretrained(root / "model")
    build_tiny_processor(tokenizer).save_pretrained(root / "model")
    encoder, image_processor, _ = load_image_encoder(str(root / "model"))
    report = embed_shards(
        encoder, image_processor, str(root / "tars" / "*.tar"), root / "one", show_progress=False
    )
    assert report["shards_written"] == 3 and report["images_encoded"] == 14
    return {"root": root, "good": sorted(set(keys) - {BROKEN}), "reference": _embeddings(root / "one")}


def _args(corpus, out: Path, *extra: str) -> list[str]:
    root = corpus["root"]
    return [
        "--model",
        str(root / "model"),
        "--data",
        str(root / "tars" / "*.tar"),
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_two_ranks_write_every_image_once_with_the_embeddings_of_one_process(corpus, tmp_path):
    out = tmp_path / "two"
    status, output = _launch_embed(tmp_path, *_args(corpus, out, "--batch_size", "4"))
    assert status == 0, output[-4000:]
    info = json.loads((out / "embed_info.json").read_text())
    assert info["complete"] and info["shards_written"] == 3 and info["shards_already_done"] == 0
    assert info["images_encoded_per_rank"] == [11, 3]  # shards 0 and 2 | shard 1 (its broken image skipped)
    assert [Path(name).name for name, _ in info["skipped"]] == [f"shard-0001.tar::{BROKEN}"]
    merged = _embeddings(out)
    assert sorted(merged) == corpus["good"]  # every good image, none twice (checked in _embeddings)
    for key, (caption, embeds) in corpus["reference"].items():
        assert merged[key][0] == caption
        torch.testing.assert_close(merged[key][1], embeds, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == [
        "embed_info.json",
        "shard-0000.parquet",
        "shard-0000.skipped.json",
        "shard-0001.parquet",
        "shard-0001.skipped.json",
        "shard-0002.parquet",
        "shard-0002.skipped.json",
    ]  # fmt: skip  (no temporary file left)


@pytest.mark.slow
def test_one_failing_rank_fails_the_launch_keeps_finished_shards_and_the_rerun_completes(corpus, tmp_path):
    """Shard 0 was written by an earlier run. With ``--on_bad_image error`` rank 1 fails on shard 1's broken image
    while rank 0 writes shard 2: the launch exits 2 naming process 1 and the sample, shard 1 has no output (and
    no temporary file), shard 0 is untouched, ``embed_info.json`` says the folder is incomplete and which shard is
    missing. The same command again (one process, bad images skipped) writes only shard 1."""
    root, out = corpus["root"], tmp_path / "out"
    out.mkdir()
    for name in ("shard-0000.parquet", "shard-0000.skipped.json"):
        shutil.copy(root / "one" / name, out / name)
    earlier = (out / "shard-0000.parquet").read_bytes()

    status, output = _launch_embed(tmp_path, *_args(corpus, out, "--on_bad_image", "error"))
    assert status != 0 and "process 1" in output and BROKEN in output, output[-4000:]
    assert (out / "shard-0000.parquet").read_bytes() == earlier
    assert sorted(p.name for p in out.iterdir()) == [
        "embed_info.json", "shard-0000.parquet", "shard-0000.skipped.json", "shard-0002.parquet",
        "shard-0002.skipped.json",
    ]  # fmt: skip
    info = json.loads((out / "embed_info.json").read_text())
    assert info["complete"] is False and info["images_encoded_per_rank"] == [6, None]
    assert [f.split(":")[0] for f in info["failures"]] == ["process 1"] and BROKEN in info["failures"][0]
    assert [Path(s).name for s in info["shards_missing"]] == ["shard-0001.tar"]
    assert sorted(_embeddings(out)) == sorted(k for k in corpus["good"] if not k.startswith("s001"))

    assert clipcap(["embed", *_args(corpus, out)]) == 0
    info = json.loads((out / "embed_info.json").read_text())
    assert info["complete"] and info["shards_written"] == 1 and info["shards_already_done"] == 2
    merged = _embeddings(out)
    assert sorted(merged) == corpus["good"]
    for key, (_, embeds) in corpus["reference"].items():
        torch.testing.assert_close(merged[key][1], embeds, rtol=1e-5, atol=1e-6)


def test_a_write_that_fails_midway_leaves_no_file_that_looks_complete(corpus, tmp_path, monkeypatch, capsys):
    """The disk fills up while shard 0's Parquet is half written: the command fails (status 2) naming the error,
    no ``.parquet`` and no temporary file is left, and ``embed_info.json`` lists every shard as still missing."""
    import pyarrow.parquet

    def half_then_fail(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1" + b"\0" * 100)  # the start of a Parquet file, never finished
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pyarrow.parquet, "write_table", half_then_fail)
    out = tmp_path / "out"
    assert clipcap(["embed", *_args(corpus, out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["embed_info.json"]
    info = json.loads((out / "embed_info.json").read_text())
    assert info["complete"] is False and len(info["shards_missing"]) == 3
