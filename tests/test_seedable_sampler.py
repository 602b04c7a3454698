"""The training shuffle is Accelerate's seedable sampler (``DataLoaderConfiguration(use_seedable_sampler=True,
data_seed=--seed)``), iterated by ``training_data.epoch_batches``. It replaced the project's own
``EpochShuffleSampler``; these are the properties that one gave, checked on Accelerate's:

* every process draws the same order, whatever its global RNG state, and takes every P-th batch of it;
* ``set_epoch`` reshuffles, and the epoch alone (with the seed) decides the order, so a run can start in any epoch;
* one process with batch 2B trains on the batches of two processes with batch B;
* a run resumed mid-epoch from an Accelerate checkpoint (``skip_first_batches``) sees the batches that the
  uninterrupted run saw, in the first epoch and in later ones (Accelerate 1.12's skipping loader restarts the
  sampler's epoch at 0 unless told the epoch: ``epoch_batches`` tells it).

Processes are simulated with ``accelerate.data_loader.prepare_data_loader(num_processes=P, process_index=r)``, the
call ``Accelerator.prepare`` makes in each process of a launch; tests/test_train.py runs two real gloo processes.
"""

from __future__ import annotations

import pytest
import torch

from modeling_clipcap.training_data import CachedCaptionDataset, epoch_batches, make_dataloaders

N, SEED = 23, 7  # 23 rows: no batch size below divides them, so every epoch ends with a short batch


def _train_loader(processor, batch_size: int) -> torch.utils.data.DataLoader:
    """train.py's training loader (make_dataloaders) over rows whose image_embeds is their own index."""
    data = {
        "train": CachedCaptionDataset(
            torch.arange(N, dtype=torch.float32)[:, None], list(range(N)), ["a cat."] * N
        ),
        "encode_stats": {"Encoding train images": {}},
        "val_images": None,
    }
    loader, _ = make_dataloaders(
        data,
        processor,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=4,
        max_caption_length=8,
    )
    return loader


def _process_loader(processor, batch_size: int, num_processes: int, rank: int, seed: int = SEED):
    """The loader process ``rank`` of ``num_processes`` gets from ``Accelerator.prepare`` under train.py's config."""
    from accelerate.data_loader import prepare_data_loader

    torch.manual_seed(
        1000 + rank
    )  # every process has its own global RNG state: the order must not depend on it
    return prepare_data_loader(
        _train_loader(processor, batch_size),
        num_processes=num_processes,
        process_index=rank,
        rng_types=["generator"],
        use_seedable_sampler=True,
        data_seed=seed,
    )


def _rows(batches) -> list[list[int]]:
    return [batch["image_embeds"][:, 0].long().tolist() for batch in batches]


def _interleave(per_process: list[list[list[int]]]) -> list[list[int]]:
    """Step k of P processes: process 0's batch k, then process 1's, ... (the global batch of step k)."""
    return [sum((batches[k] for batches in per_process), []) for k in range(len(per_process[0]))]


@pytest.mark.parametrize("num_processes", [2, 3])
def test_every_process_draws_the_same_order_and_takes_every_pth_batch(tiny_processor, num_processes):
    one = _rows(epoch_batches(_process_loader(tiny_processor, 2, 1, 0), 0))
    order = sum(one, [])
    assert sorted(order) == list(range(N)) and order != list(range(N))  # a shuffle of every row once
    loaders = [_process_loader(tiny_processor, 2, num_processes, r) for r in range(num_processes)]
    per_process = [_rows(epoch_batches(loader, 0)) for loader in loaders]
    assert len({len(batches) for batches in per_process}) == 1  # the same number of steps on every process
    # process r's k-th batch is batch kP + r of the one-process order: together that order, then Accelerate's
    # padding of the last step from the epoch's first rows
    steps = sum(_interleave(per_process), [])
    assert steps[:N] == order and steps[N:] == order[: len(steps) - N]


def test_set_epoch_reshuffles_and_the_seed_and_epoch_alone_decide_the_order(tiny_processor):
    loader = _process_loader(tiny_processor, 4, 1, 0)
    epochs = [sum(_rows(epoch_batches(loader, e)), []) for e in range(3)]
    assert all(sorted(order) == list(range(N)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3  # another order every epoch
    fresh = _process_loader(tiny_processor, 4, 1, 0)  # another loader, another global RNG state
    assert sum(_rows(epoch_batches(fresh, 2)), []) == epochs[2]  # straight into epoch 2
    assert sum(_rows(epoch_batches(fresh, 0)), []) == epochs[0]  # and back
    assert sum(_rows(epoch_batches(loader, 1)), []) == epochs[1]  # the same loader, again
    other_seed = _process_loader(tiny_processor, 4, 1, 0, seed=SEED + 100)
    assert sum(_rows(epoch_batches(other_seed, 0)), []) != epochs[0]  # --seed reaches the order


def test_one_process_with_batch_2b_trains_on_the_batches_of_two_processes_with_batch_b(tiny_processor):
    for epoch in (0, 1):
        one = _rows(epoch_batches(_process_loader(tiny_processor, 6, 1, 0), epoch))
        two = _interleave(
            [_rows(epoch_batches(_process_loader(tiny_processor, 3, 2, r), epoch)) for r in (0, 1)]
        )
        assert len(one) == len(two) == 4  # 23 rows: steps of 6, 6, 6 and 5
        assert two[:3] == one[:3]
        # the last, short step: the same 5 rows, and two processes fill their batches from the epoch's first row
        assert two[3][:5] == one[3] and two[3][5:] == one[0][:1]


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize(("epoch", "done"), [(0, 2), (1, 3), (2, 1)])
def test_a_resume_mid_epoch_sees_the_batches_of_the_uninterrupted_run(
    tiny_processor, num_processes, epoch, done
):
    """``done`` batches of ``epoch`` were consumed when the checkpoint was written; the resumed run skips them
    (train.py: ``epoch_batches(loader, epoch, skip=done)``) and goes on into the next epoch."""
    runs = {}
    for name, skip in (("full", 0), ("resumed", done)):
        loaders = [_process_loader(tiny_processor, 3, num_processes, r) for r in range(num_processes)]
        runs[name] = [
            _interleave([_rows(epoch_batches(lo, e, skip if e == epoch else 0)) for lo in loaders])
            for e in range(epoch, epoch + 2)
        ]
    full, resumed = runs["full"], runs["resumed"]
    assert resumed[0] == full[0][done:] and resumed[1] == full[1]


def test_train_py_prepares_the_loader_with_accelerates_seedable_sampler_and_resumes_from_a_checkpoint(
    tiny_processor, tmp_path
):
    """train.py's Accelerator; a checkpoint (``save_state``) taken after 3 batches of epoch 1 and loaded by a new
    Accelerator and loader: the same batches as the uninterrupted run from there on."""
    import sys

    from accelerate.data_loader import SeedableRandomSampler
    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "training"))
    import train

    args = train.parse_args(["--train_file", "x", "--output_dir", str(tmp_path / "out"), "--seed", str(SEED)])
    accelerator = train.setup_accelerator(args)
    loader = accelerator.prepare(_train_loader(tiny_processor, 3))
    sampler = loader.get_sampler()
    assert isinstance(sampler, SeedableRandomSampler) and sampler.initial_seed == SEED
    full = [_rows(epoch_batches(loader, e)) for e in range(3)]

    _rows(epoch_batches(loader, 0))
    consumed = [batch for _, batch in zip(range(3), epoch_batches(loader, 1))]
    assert _rows(consumed) == full[1][:3]
    accelerator.save_state(str(tmp_path / "checkpoint"))

    torch.manual_seed(12345)  # a new process: another global RNG state until the checkpoint's is loaded
    accelerator = train.setup_accelerator(args)
    loader = accelerator.prepare(_train_loader(tiny_processor, 3))
    accelerator.load_state(str(tmp_path / "checkpoint"))
    assert _rows(epoch_batches(loader, 1, skip=3)) == full[1][3:]
    assert _rows(epoch_batches(loader, 2)) == full[2]
