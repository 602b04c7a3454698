"""Web-scale data: WebDataset / Parquet shards, streaming over processes and workers, exact mid-stream resume.

Shards are written by the tests (odd shard and sample counts, one broken sample: an HTML page named .jpg).
Fast tests drive :mod:`modeling_clipcap.shards` and ``train.main`` in this process; the ``slow`` ones launch
two CPU ranks over gloo with ``accelerate launch``.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_CORPUS, build_tiny_tokenizer, subprocess_env, write_tiny_preset
from PIL import Image

sys.path.insert(0, str(REPO_ROOT / "training"))

import train  # noqa: E402

from modeling_clipcap.data import CaptionCollator, CaptionDataError  # noqa: E402
from modeling_clipcap.image_io import ImageLoadError  # noqa: E402
from modeling_clipcap.shards import (  # noqa: E402
    ShardError,
    ShardStreamLoader,
    StreamCollator,
    expand_braces,
    expand_shards,
    is_shard_source,
    iter_shard_rows,
    load_shard_captions,
)

TRAIN_SCRIPT = str(REPO_ROOT / "training" / "train.py")
BROKEN = "s001-0002"  # the HTML page named .jpg
SHARD_SIZES = (5, 4, 6)  # 3 shards (odd), 15 samples (odd)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), "RGB").save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, sizes=SHARD_SIZES, broken: str | None = BROKEN) -> list[str]:
    """img2dataset-style tars ``shard-000{i}.tar``: ``{key}.jpg``, ``{key}.txt``, ``{key}.json``; returns the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s, size in enumerate(sizes):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(size):
                key = f"s{s:03d}-{i:04d}"
                image = b"<html><body>404 not found</body></html>" if key == broken else _jpeg(s * 100 + i)
                _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", TINY_CORPUS[(s * 7 + i) % 8].encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                keys.append(key)
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    keys = write_shards(root / "tars")
    return {"root": root, "pattern": str(root / "tars" / "shard-{0000..0002}.tar"), "keys": keys}


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return write_tiny_preset(
        tmp_path_factory.mktemp("preset") / "preset",
        {
            "learning_rate": 1e-2,
            "num_warmup_steps": 2,
            "max_caption_length": 24,
            "per_device_train_batch_size": 2,
        },
    )


def _collate(on_bad_image: str = "skip") -> StreamCollator:
    from conftest import build_tiny_processor

    processor = build_tiny_processor(build_tiny_tokenizer())
    collator = CaptionCollator(processor.tokenizer, 24, image_processor=processor.image_processor)
    return StreamCollator(collator, on_bad_image)


# ------------------------------------------------------------------------------------------------ reading


def test_patterns_expand_braces_and_globs(shards):
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/p-{1..2}.parquet") == [
        "x/p-1.parquet",
        "x/p-2.parquet",
        "y/p-1.parquet",
        "y/p-2.parquet",
    ]
    assert is_shard_source(shards["pattern"]) and is_shard_source("s3://bucket/cc-{000..009}.tar")
    assert not is_shard_source("data/dataset_coco.json")
    folder = Path(shards["pattern"]).parent
    assert expand_shards(str(folder / "*.tar")) == expand_shards(shards["pattern"])
    assert len(expand_shards(shards["pattern"])) == 3
    with pytest.raises(ShardError, match="no shard matches"):
        expand_shards(str(folder / "nothing-*.tar"))


def test_rows_come_from_tar_and_parquet_through_datasets_builders(shards, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(iter_shard_rows(expand_shards(shards["pattern"])))
    assert [r["key"] for r in rows] == shards["keys"]
    assert rows[0]["caption"] == TINY_CORPUS[0] and rows[0]["image"]["bytes"][:2] == b"\xff\xd8"
    assert rows[0]["image"]["path"].endswith("shard-0000.tar::s000-0000")
    # Parquet: image bytes, or precomputed embeddings
    pq.write_table(
        pa.table({"key": ["a", "b"], "caption": ["a cat.", "a dog."], "image": [_jpeg(1), _jpeg(2)]}),
        tmp_path / "img.parquet",
    )
    pq.write_table(
        pa.table({"key": ["c"], "caption": ["a red circle."], "image_embeds": [[0.5] * 24]}),
        tmp_path / "emb.parquet",
    )
    (img,) = [r for r in iter_shard_rows([str(tmp_path / "img.parquet")]) if r["key"] == "a"]
    assert img["image"]["bytes"] == _jpeg(1) and img["caption"] == "a cat."
    (emb,) = iter_shard_rows([str(tmp_path / "emb.parquet")])
    assert emb["key"] == "c" and list(emb["image_embeds"]) == [0.5] * 24
    table, report = load_shard_captions(str(tmp_path / "emb.parquet"))
    assert table.column_names == ["image_id", "captions", "image_embeds"] and report.num_captions == 1


def test_a_missing_or_truncated_shard_fails_with_its_name(shards, tmp_path):
    folder = tmp_path / "tars"
    write_shards(folder, sizes=(2, 2), broken=None)
    data = (folder / "shard-0001.tar").read_bytes()
    (folder / "shard-0001.tar").write_bytes(data[: len(data) // 3])  # cut mid-file
    with pytest.raises(ShardError, match=r"shard-0001\.tar"):
        list(iter_shard_rows(expand_shards(str(folder / "shard-{0000..0001}.tar"))))
    with pytest.raises(ShardError, match=r"shard-0002\.tar"):  # listed, but gone
        list(iter_shard_rows([str(folder / "shard-0000.tar"), str(folder / "shard-0002.tar")]))


def test_training_stops_at_a_shard_gone_midway_with_its_name(shards, preset, tmp_path):
    folder = tmp_path / "tars"
    write_shards(folder, sizes=(3, 3), broken=None)
    argv = ["--config", str(preset), "--train_file", str(folder / "shard-{0000..0002}.tar"), "--streaming"]
    argv += [
        "--max_train_steps",
        "20",
        "--output_dir",
        str(tmp_path / "run"),
        "--dataloader_num_workers",
        "2",
    ]
    with pytest.raises(
        ShardError, match=r"shard-0002\.tar"
    ):  # read by a loader worker after shard 0's batches
        train.main(argv)
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()][
        :1
    ] == [1]


def test_a_bad_image_fails_naming_shard_and_key_or_is_skipped_and_reported(shards):
    rows = [
        r | {"_state": None}
        for r in iter_shard_rows(expand_shards(shards["pattern"]))
        if r["shard"].endswith("1.tar")
    ]
    with pytest.raises(ImageLoadError, match=rf"shard-0001\.tar.*{BROKEN}.*--on_bad_image skip"):
        _collate("fail")(rows)
    out = _collate("skip")(rows)
    assert BROKEN not in out["keys"] and len(out["keys"]) == 3 and out["batch"]["pixel_values"].shape[0] == 3
    assert out["skipped"][0][:2] == [BROKEN, rows[0]["shard"]] and "image" in out["skipped"][0][2]


# ------------------------------------------------------------------------------------------------ streaming


def _keys_of(loader: ShardStreamLoader, limit: int | None = None) -> list[str]:
    """Consumed keys, read back from the sample-order file."""
    for n, _ in enumerate(loader, 1):
        if limit is not None and n >= limit:
            break
    loader._close_order_file()
    return loader.sample_order_file.read_text().split()


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (2, 3)])
def test_every_good_sample_once_across_ranks_and_workers(shards, tmp_path, world_size, num_workers):
    good = sorted(set(shards["keys"]) - {BROKEN})
    seen, skipped = [], []
    for rank in range(world_size):
        loader = ShardStreamLoader(
            expand_shards(shards["pattern"]),
            batch_size=2,
            collate=_collate(),
            num_workers=num_workers,
            rank=rank,
            world_size=world_size,
            sample_order_file=tmp_path / f"rank-{rank}.txt",
        )
        seen += _keys_of(loader)
        skipped += [s[0] for s in loader.skipped]
        assert loader.samples_seen == len(loader.sample_order_file.read_text().split())
    assert sorted(seen) == good and len(seen) == len(set(seen))
    assert skipped == [BROKEN]


def test_more_workers_than_shards_warns_and_still_reads_every_sample_once(shards, tmp_path, caplog):
    loader = ShardStreamLoader(
        expand_shards(shards["pattern"]), batch_size=2, collate=_collate(), num_workers=5,
        sample_order_file=tmp_path / "order.txt",
    )  # fmt: skip
    assert loader.num_streams == 3
    assert "5 loader workers asked for 3 shard(s)" in caplog.text
    keys = _keys_of(loader)
    assert sorted(keys) == sorted(set(shards["keys"]) - {BROKEN}) and len(keys) == len(set(keys))


def test_resuming_from_a_saved_position_consumes_the_same_samples_in_the_same_order(shards, tmp_path):
    def loader(name: str) -> ShardStreamLoader:
        return ShardStreamLoader(
            expand_shards(shards["pattern"]),
            batch_size=2,
            collate=_collate(),
            num_workers=2,
            sample_order_file=tmp_path / name / "rank-0.txt",
        )

    full = _keys_of(loader("full"))
    first = loader("killed")
    batches = iter(first)
    for _ in range(3):
        next(batches)
    first.save_position(tmp_path / "checkpoint")
    for _ in range(2):  # consumed after the checkpoint, then lost with the process
        next(batches)
    del batches
    first._close_order_file()
    second = loader("killed")
    second.load_position(tmp_path / "checkpoint")
    assert _keys_of(second) == full
    assert second.skipped and second.skipped[0][0] == BROKEN
    with pytest.raises(CaptionDataError, match="other shards or another --dataloader_num_workers"):
        ShardStreamLoader(
            expand_shards(shards["pattern"]), batch_size=2, collate=_collate(), num_workers=1
        ).load_position(tmp_path / "checkpoint")


# ------------------------------------------------------------------------------------------------ train.py


def test_train_streams_shards_and_reports_samples_and_skips(shards, preset, tmp_path):
    out = tmp_path / "run"
    argv = [
        "--config",
        str(preset),
        "--train_file",
        shards["pattern"],
        "--streaming",
        "--max_train_steps",
        "50",
    ]
    argv += ["--num_train_epochs", "1", "--output_dir", str(out), "--dataloader_num_workers", "2"]
    argv += ["--validation_file", shards["pattern"].replace("{0000..0002}", "0000")]
    argv += ["--embedding_cache_dir", str(tmp_path / "cache")]
    argv += ["--on_bad_image", "skip", "--save_sample_order"]
    summary = train.main(argv)
    assert "eval_loss" in summary["final_metrics"]  # validation read from a shard (in memory)
    assert summary["embedding_cache"]["Encoding validation images"]["encoded"] == 5
    good = set(shards["keys"]) - {BROKEN}
    assert summary["samples_seen_per_rank"] == [len(good)]
    assert summary["completed_steps"] == 8  # worker 0: 11 samples in 6 batches, worker 1: 4 in 2
    assert [s["key"] for s in summary["skipped_samples"]] == [BROKEN]
    order = (out / "sample_order" / "rank-0.txt").read_text().split()
    assert sorted(order) == sorted(good)
    # two workers (shards 0 and 2 | shard 1) take turns: the second batch comes from shard 1
    assert order[:4] == ["s000-0000", "s000-0001", "s001-0000", "s001-0001"]
    results = json.loads((out / "train_results.json").read_text())
    assert results["samples_seen_per_rank"] == [14] and results["skipped_samples"][0]["key"] == BROKEN
    with pytest.raises(ImageLoadError, match=rf"shard-0001\.tar.*{BROKEN}"):  # default: a clear error
        train.main(argv[:-3] + ["--on_bad_image", "error", "--output_dir", str(tmp_path / "strict")])


# ------------------------------------------------------------------------------------------------ clipcap embed


def test_embed_writes_parquet_split_over_processes_resumes_and_train_opens_no_image(
    shards, tmp_path, tiny_model, tiny_processor
):
    import shutil

    import pyarrow.parquet as pq

    from modeling_clipcap.cli import main as clipcap
    from modeling_clipcap.embed import embed_shards, load_image_encoder
    from modeling_clipcap.embedding_cache import encode_images

    model_dir, tars, emb = tmp_path / "model", tmp_path / "tars", tmp_path / "emb"
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    shutil.copytree(Path(shards["pattern"]).parent, tars)
    encoder, image_processor, _ = load_image_encoder(str(model_dir))
    reports = [
        embed_shards(encoder, image_processor, str(tars / "*.tar"), emb, batch_size=4, rank=r, world_size=2)
        for r in range(2)
    ]
    assert [r["shards_written"] for r in reports] == [2, 1]  # shards 0 and 2 | shard 1
    assert [r["images_encoded"] for r in reports] == [11, 3] and reports[1]["skipped"][0][0].endswith(BROKEN)
    table = pq.read_table(emb / "shard-0001.parquet")
    assert table.column_names == ["key", "caption", "image_embeds"] and BROKEN not in table["key"].to_pylist()
    rows = {r["key"]: r for r in iter_shard_rows([str(tars / "shard-0001.tar")])}
    direct, _, _ = encode_images(
        tiny_model, tiny_processor.image_processor, [rows[k]["image"] for k in table["key"].to_pylist()]
    )
    torch.testing.assert_close(torch.tensor(table["image_embeds"].to_pylist()), direct)
    # the same command again: every shard is already complete
    assert (
        clipcap(["embed", "--model", str(model_dir), "--data", str(tars / "*.tar"), "--output_dir", str(emb)])
        == 0
    )
    info = json.loads((emb / "embed_info.json").read_text())
    assert info["shards_already_done"] == 3 and info["images_encoded_per_rank"] == [0]

    shutil.rmtree(tars)  # training cannot open an image now
    for extra in ([], ["--streaming", "--max_train_steps", "20", "--num_train_epochs", "1"]):
        out = tmp_path / f"train{len(extra)}"
        summary = train.main(
            [
                "--model_name_or_path",
                str(model_dir),
                "--train_file",
                str(emb / "*.parquet"),
                "--output_dir",
                str(out),
            ]
            + ["--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--num_warmup_steps", "0"]
            + ["--embedding_cache_dir", str(tmp_path / "cache"), *extra]
        )
        assert (
            summary["embedding_cache"] == {} and summary["completed_steps"] == 4
        )  # 14 captions, batches of 4
        assert not (tmp_path / "cache").exists()


def test_a_tokens_model_trains_from_embeds_patch_tokens_without_opening_an_image(
    shards, tmp_path, tiny_tokenizer, tiny_processor
):
    """mapping_input="tokens" trains from the Parquet's patch_tokens (N, D) (in memory and streamed); a Parquet
    holding pooled image_embeds only is refused naming its shard and the flag that writes the tokens."""
    import shutil

    from conftest import tiny_clipcap_config

    from modeling_clipcap import ClipCapForConditionalGeneration
    from modeling_clipcap.embed import embed_shards, load_image_encoder

    torch.manual_seed(0)
    config = tiny_clipcap_config(len(tiny_tokenizer), "transformer", mapping_input="tokens")
    model_dir, tars = tmp_path / "model", tmp_path / "tars"
    ClipCapForConditionalGeneration(config).save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    shutil.copytree(Path(shards["pattern"]).parent, tars)
    encoder, image_processor, _ = load_image_encoder(str(model_dir))
    for folder, tokens in (("emb", True), ("pooled", False)):
        embed_shards(encoder, image_processor, str(tars / "*.tar"), tmp_path / folder, patch_tokens=tokens)
    rows = list(iter_shard_rows(expand_shards(str(tmp_path / "emb" / "*.parquet")), "tokens"))
    first = torch.tensor(rows[0]["image_embeds"])
    assert first.ndim == 2 and first.shape[-1] == config.vision_config.hidden_size  # (N, D_tokens) per image
    shutil.rmtree(tars)  # training cannot open an image now

    def run(data: str, *extra: str) -> dict:
        return train.main(
            ["--model_name_or_path", str(model_dir), "--train_file", str(tmp_path / data / "*.parquet")]
            + ["--output_dir", str(tmp_path / f"out-{data}-{len(extra)}"), "--per_device_train_batch_size", "4"]
            + ["--num_train_epochs", "1", "--num_warmup_steps", "0"]
            + ["--embedding_cache_dir", str(tmp_path / "cache"), *extra]
        )  # fmt: skip

    for extra in ([], ["--streaming", "--max_train_steps", "20"]):
        summary = run("emb", *extra)
        assert (
            summary["completed_steps"] == 4 and summary["embedding_cache"] == {}
        )  # 14 captions, batches of 4
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ShardError, match=r"shard-0000\.parquet.*no patch_tokens.*--patch_tokens"):
        run("pooled")


def test_embed_takes_a_bare_image_tower_checkpoint(shards, tmp_path):
    import pyarrow.parquet as pq
    from conftest import tiny_vision_config
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    from modeling_clipcap.embed import embed_shards, load_image_encoder
    from modeling_clipcap.image_io import load_image

    torch.manual_seed(0)
    tower = CLIPVisionModelWithProjection(tiny_vision_config()).eval()
    tower.save_pretrained(tmp_path / "tower")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "tower")
    encoder, image_processor, described = load_image_encoder(str(tmp_path / "tower"))
    assert described["tower"] == "clip_vision_model"
    first = shards["pattern"].replace("{0000..0002}", "0000")
    report = embed_shards(encoder, image_processor, first, tmp_path / "emb", show_progress=False)
    assert report["images_encoded"] == 5
    table = pq.read_table(tmp_path / "emb" / "shard-0000.parquet")
    images = [load_image(r["image"]) for r in iter_shard_rows([first])]
    with torch.no_grad():
        expected = tower(pixel_values=processor(images, return_tensors="pt")["pixel_values"]).image_embeds
    torch.testing.assert_close(torch.tensor(table["image_embeds"].to_pylist()), expected)


def test_embed_cli_flags_patch_tokens_batch_size_dtype_and_bad_image_policy(
    shards, tmp_path, tiny_model, tiny_processor, monkeypatch, capsys
):
    import pyarrow.parquet as pq

    from modeling_clipcap import ClipCapForConditionalGeneration
    from modeling_clipcap.cli import main as clipcap

    tiny_model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    calls = []
    original = ClipCapForConditionalGeneration.get_image_embeddings
    monkeypatch.setattr(
        ClipCapForConditionalGeneration,
        "get_image_embeddings",
        lambda self, *a, **k: (
            calls.append(a[0].shape[0] if a else k["pixel_values"].shape[0]) or original(self, *a, **k)
        ),
    )
    base = [
        "embed",
        "--model",
        str(tmp_path / "model"),
        "--data",
        shards["pattern"].replace("{0000..0002}", "0001"),
    ]
    # the broken sample: skipped by default, an error naming it with --on_bad_image error
    assert clipcap(base + ["--output_dir", str(tmp_path / "strict"), "--on_bad_image", "error"]) == 2
    assert BROKEN in capsys.readouterr().err and not list((tmp_path / "strict").glob("*.parquet"))
    calls.clear()
    assert clipcap(base + ["--output_dir", str(tmp_path / "a"), "--batch_size", "2", "--patch_tokens"]) == 0
    # 4 images in batches of 2, the broken one dropped from the second; then the 3 good ones again for tokens
    assert calls == [2, 1, 2, 1]
    table = pq.read_table(tmp_path / "a" / "shard-0001.parquet")
    tokens = torch.tensor(table["patch_tokens"].to_pylist())
    assert tokens.shape == (3, 17, 32)  # 1 + (32 / 8)^2 tokens of the tiny tower's width
    assert clipcap(base + ["--output_dir", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    fp32 = torch.tensor(table["image_embeds"].to_pylist())
    bf16 = torch.tensor(pq.read_table(tmp_path / "b" / "shard-0001.parquet")["image_embeds"].to_pylist())
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, atol=0.1)


# ------------------------------------------------------------------------------------------------ slow: 2 ranks

DRIVER = r"""
import os, sys, time
sys.path.insert(0, os.environ["TRAINING_DIR"])
import train
from modeling_clipcap import ClipCapForConditionalGeneration

delay = float(os.environ.get("STEP_DELAY", "0"))
original_forward = ClipCapForConditionalGeneration.forward

def slow_forward(self, *args, **kwargs):  # numerics unchanged; lets an outside SIGKILL land mid-run
    if self.training and delay:
        time.sleep(delay)
    return original_forward(self, *args, **kwargs)

ClipCapForConditionalGeneration.forward = slow_forward
sys.exit(train.cli())
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(driver: Path, argv: list[str], env: dict, kill_after_step: int | None = None):
    """``accelerate launch`` 2 CPU ranks over gloo; with ``kill_after_step``, SIGKILL the whole launch (its
    process group) once the main process has logged that step."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), str(driver), *argv]
    out = Path(argv[argv.index("--output_dir") + 1])
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed_at = None
    if kill_after_step is not None:
        import os

        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            steps = [json.loads(x)["step"] for x in _lines(out / "train_log.jsonl") if '"loss"' in x]
            if steps and steps[-1] >= kill_after_step:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = steps[-1]
                break
            time.sleep(0.02)
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output, killed_at


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [x for x in path.read_text().splitlines() if x.endswith("}")]


@pytest.mark.slow
def test_two_ranks_two_workers_read_every_sample_once_and_resume_exactly_after_sigkill(
    shards, preset, tmp_path
):
    """2 gloo ranks x 2 workers over 3 shards of 5, 4 and 6 samples, one broken: the union of the ranks' sample
    orders is every good key once, the broken one is reported. Then the same run is SIGKILLed after its step-4
    checkpoint and resumed from ``latest``: identical weights, and the same keys in the same order per rank."""
    from safetensors.torch import load_file

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = subprocess_env(tmp_path, TRAINING_DIR=str(REPO_ROOT / "training"), ACCELERATE_USE_CPU="true")

    def argv(out: Path, *extra: str) -> list[str]:
        return [
            "--config", str(preset), "--train_file", shards["pattern"], "--streaming", "--output_dir", str(out),
            "--max_train_steps", "40", "--num_train_epochs", "1", "--per_device_train_batch_size", "1",
            "--dataloader_num_workers", "2", "--on_bad_image", "skip", "--save_sample_order",
            "--checkpointing_steps", "2", *extra,
        ]  # fmt: skip

    full, killed = tmp_path / "full", tmp_path / "killed"
    status, output, _ = _launch_two_ranks(driver, argv(full), env)
    assert status == 0, output[-4000:]
    results = json.loads((full / "train_results.json").read_text())
    orders = [(full / "sample_order" / f"rank-{r}.txt").read_text().split() for r in range(2)]
    good = sorted(set(shards["keys"]) - {BROKEN})
    assert sorted(orders[0] + orders[1]) == good  # every good key, none twice
    assert (
        results["samples_seen_per_rank"] == [len(o) for o in orders]
        and sum(results["samples_seen_per_rank"]) == 14
    )
    assert [(s["key"], Path(s["shard"]).name) for s in results["skipped_samples"]] == [
        (BROKEN, "shard-0001.tar")
    ]
    steps = results["completed_steps"]
    assert steps == max(len(o) for o in orders)  # the shorter rank padded, no sample dropped

    slow = dict(env, STEP_DELAY="0.4")
    status, output, at = _launch_two_ranks(driver, argv(killed), slow, kill_after_step=5)
    assert status != 0 and at is not None and at < steps, output[-4000:]
    assert (killed / "checkpoints" / "step_4" / "stream_state_1.json").is_file()
    status, output, _ = _launch_two_ranks(driver, argv(killed, "--resume_from_checkpoint", "latest"), env)
    assert status == 0 and "Resumed from checkpoint" in output, output[-4000:]
    for r in range(2):
        assert (killed / "sample_order" / f"rank-{r}.txt").read_text().split() == orders[r]
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, diff
    resumed = json.loads((killed / "train_results.json").read_text())
    assert resumed["samples_seen_per_rank"] == results["samples_seen_per_rank"]
    assert [s["key"] for s in resumed["skipped_samples"]] == [BROKEN]


@pytest.mark.slow
def test_two_ranks_share_the_encoding_of_the_embedding_cache_and_a_failing_rank_fails_the_run(
    shards, preset, tmp_path
):
    """Non-streaming from tar shards on 2 gloo ranks: each rank encodes its half of the unique images into the one
    fingerprinted cache (a 1-process run then encodes nothing); a bad image under the default policy fails every
    rank with the message of the rank that met it."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = subprocess_env(tmp_path, TRAINING_DIR=str(REPO_ROOT / "training"), ACCELERATE_USE_CPU="true")
    cache = tmp_path / "cache"

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--config", str(preset), "--train_file", shards["pattern"], "--output_dir", str(out)] + [
            "--embedding_cache_dir", str(cache), "--max_train_steps", "2", *extra,
        ]  # fmt: skip

    status, output, _ = _launch_two_ranks(driver, argv(tmp_path / "two", "--on_bad_image", "skip"), env)
    assert status == 0, output[-4000:]
    results = json.loads((tmp_path / "two" / "train_results.json").read_text())
    assert results["images_encoded_per_rank"] == [8, 6]  # 15 unique images: 8 | 7, one of them broken
    listed = json.loads((tmp_path / "two" / "skipped_images.json").read_text())["images"]
    assert results["skipped_images"] == 1 and [Path(name).name for name, _ in listed] == [
        f"shard-0001.tar::{BROKEN}"
    ]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1 and not list(
        cache.glob(".*parts")
    )

    summary = train.main(argv(tmp_path / "one", "--on_bad_image", "skip"))  # this process alone, same cache
    assert summary["images_encoded_per_rank"] == [0]

    status, output, _ = _launch_two_ranks(
        driver, argv(tmp_path / "strict", "--embedding_cache_dir", str(tmp_path / "c2")), env
    )
    assert status != 0 and "process 1" in output and BROKEN in output, output[-4000:]
    assert not (tmp_path / "strict" / "train_results.json").exists()
