"""Streaming shards over more than one epoch: ``set_epoch`` starts each epoch, ``--shuffle_shards`` gives each epoch
its own shard order, and a run stopped in the first epoch and resumed reads exactly what an uninterrupted run reads,
up to and across the epoch boundary.

The shards are those of tests/test_webscale.py (3 tars of 5, 4 and 6 samples, one broken image): 14 good
samples per epoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, write_tiny_preset
from test_webscale import BROKEN, _collate, write_shards

from modeling_clipcap.data import CaptionDataError
from modeling_clipcap.shards import ShardStreamLoader, expand_shards

sys.path.insert(0, str(REPO_ROOT / "training"))

import train  # noqa: E402

SEED = 42  # epoch 0 reads the shards in the order 1, 0, 2 and epoch 1 in 2, 0, 1 (torch.randperm)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("epoch_shards")
    keys = write_shards(root / "tars")
    return {"pattern": str(root / "tars" / "shard-{0000..0002}.tar"), "good": sorted(set(keys) - {BROKEN})}


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    training_args = {"learning_rate": 1e-2, "num_warmup_steps": 2, "max_caption_length": 24}
    training_args["per_device_train_batch_size"] = 2
    return write_tiny_preset(tmp_path_factory.mktemp("epoch_preset") / "preset", training_args)


def _loader(
    shards, folder: Path, rank: int = 0, world_size: int = 1, shuffle: bool = True
) -> ShardStreamLoader:
    return ShardStreamLoader(
        expand_shards(shards["pattern"]), batch_size=2, collate=_collate(), num_workers=2, rank=rank,
        world_size=world_size, seed=SEED, shuffle_shards=shuffle, sample_order_file=folder / f"rank-{rank}.txt",
    )  # fmt: skip


def _read_epoch(loader: ShardStreamLoader, epoch: int, stop_after: int | None = None) -> list[str]:
    """The keys ``loader`` consumes in ``epoch`` (all of it, or its first ``stop_after`` batches)."""
    before = loader.samples_seen
    loader.set_epoch(epoch)
    batches = iter(loader)
    for n, _ in enumerate(batches, 1):
        if n == stop_after:
            break
    loader._order_fh.flush()
    return loader.sample_order_file.read_text().split()[before:]


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_epoch_reads_every_sample_once_and_a_resume_inside_the_second_epoch_reads_the_rest_of_it(
    shards, tmp_path, shuffle
):
    """2 processes (simulated) x 2 workers, 2 epochs. Every epoch is every good sample once over the processes;
    with ``shuffle_shards`` the two epochs differ (and differ from the unshuffled order) and every rank computes the
    same permutation. A process stopped 3 batches into epoch 1, its position saved, resumes in a new loader
    with exactly the rest of the uninterrupted epoch 1."""
    full = {}
    for rank in range(2):
        loader = _loader(shards, tmp_path / "full", rank, 2, shuffle)
        full[rank] = [_read_epoch(loader, epoch) for epoch in range(2)]
        assert _read_epoch(loader, 1) == []  # without a new set_epoch the epoch stays consumed
    for epoch in range(2):
        union = full[0][epoch] + full[1][epoch]
        assert sorted(union) == shards["good"], epoch
    unshuffled = [_read_epoch(_loader(shards, tmp_path / "plain", 0, 2, shuffle=False), 0)]
    if shuffle:
        # (every epoch's union above is every sample once: all processes drew the same permutation)
        assert full[0][0] != full[0][1] and unshuffled[0] not in full[0]
    else:
        assert full[0][0] == full[0][1] == unshuffled[0]

    for rank in range(2):
        killed = _loader(shards, tmp_path / "killed", rank, 2, shuffle)
        assert _read_epoch(killed, 0) == full[rank][0]
        _read_epoch(killed, 1, stop_after=3)
        killed.save_position(tmp_path / f"checkpoint-{rank}")
        _read_epoch(killed, 1, stop_after=1)  # consumed after the checkpoint, lost with the process
        killed._close_order_file()
        resumed = _loader(shards, tmp_path / "killed", rank, 2, shuffle)
        resumed.load_position(tmp_path / f"checkpoint-{rank}")
        resumed.set_epoch(1)
        list(resumed)
        resumed._close_order_file()
        order = (tmp_path / "killed" / f"rank-{rank}.txt").read_text().split()
        assert order == full[rank][0] + full[rank][1]
        assert resumed.samples_seen == len(order)

    other = _loader(shards, tmp_path / "other", 0, 2, shuffle=not shuffle)
    with pytest.raises(CaptionDataError, match="--shuffle_shards"):
        other.load_position(tmp_path / "checkpoint-0")


def _argv(preset: Path, shards, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(preset), "--train_file", shards["pattern"], "--streaming", "--output_dir", str(out),
        "--max_train_steps", "100", "--num_train_epochs", "2", "--dataloader_num_workers", "2",
        "--on_bad_image", "skip", "--save_sample_order", "--report_to", "none", *extra,
    ]  # fmt: skip


def _steps(out: Path) -> dict[int, tuple[int, float]]:
    """step -> (epoch, loss) from train_log.jsonl."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: (r["epoch"], r["loss"]) for r in records if "loss" in r}


def test_train_stopped_in_the_first_epoch_resumes_into_the_second_with_the_same_samples_and_weights(
    shards, preset, tmp_path, monkeypatch
):
    """train.py, 2 streamed epochs with ``--shuffle_shards``: the loop calls ``set_epoch(0)`` then ``set_epoch(1)``
    and each epoch is the 14 good samples in its own shard order (8 steps each). The same run stopped at step 5
    (inside epoch 0), resumed and stopped at step 8 (the last step of epoch 0), then resumed to the end reads
    the same keys in the same order (so epoch 1's are exactly the uninterrupted run's), logs the same epoch
    and loss at every step and ends with identical weights. Resuming it without ``--shuffle_shards`` is refused."""
    from safetensors.torch import load_file

    calls: list[int] = []
    original = ShardStreamLoader.set_epoch
    monkeypatch.setattr(ShardStreamLoader, "set_epoch", lambda self, e: calls.append(e) or original(self, e))

    full, killed = tmp_path / "full", tmp_path / "killed"
    summary = train.main(_argv(preset, shards, full, "--shuffle_shards"))
    assert calls == [0, 1] and summary["completed_steps"] == 16 and summary["epochs"] == 2
    order = (full / "sample_order" / "rank-0.txt").read_text().split()
    first, second = order[:14], order[14:]
    assert sorted(first) == sorted(second) == shards["good"] and first != second
    expected = _steps(full)
    assert [expected[s][0] for s in sorted(expected)] == [0] * 8 + [1] * 8

    resume = ["--shuffle_shards", "--resume_from_checkpoint", "latest"]
    calls.clear()
    assert train.main(_argv(preset, shards, killed, "--shuffle_shards", "--stop_after_steps", "5"))[
        "stopped_early"
    ]
    assert train.main(_argv(preset, shards, killed, *resume, "--stop_after_steps", "8"))["stopped_early"]
    assert train.main(_argv(preset, shards, killed, *resume))["completed_steps"] == 16
    # the step-8 checkpoint is still epoch 0 (its end not yet seen): that resume finishes it, then starts epoch 1
    assert calls == [0, 0, 0, 1]
    assert (killed / "sample_order" / "rank-0.txt").read_text().split() == order
    assert _steps(killed) == expected
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0

    with pytest.raises(CaptionDataError, match="--shuffle_shards true"):
        train.main(_argv(preset, shards, killed, "--resume_from_checkpoint", "latest"))
