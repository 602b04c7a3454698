"""Training checkpoints over ``accelerator.save_state``: atomic writes, rotation, listing and exact resume.

A checkpoint is ``<output_dir>/checkpoints/<name>`` (``step_N`` or ``epoch_N``): what ``save_state`` writes
(model, optimizer, scheduler, one ``random_states_<rank>.pkl`` per process) plus ``training_state.json``,
the position in the data. Accelerate's ``ProjectConfiguration(automatic_checkpoint_naming=True)`` writes
``save_state`` straight into the final folder, so a process killed mid-save would leave a folder that looks
complete; here every checkpoint is written under ``.tmp-<name>`` and renamed into place once complete, and
only folders with ``training_state.json`` (the last file written) count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^(step|epoch)_(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
# What a resumed run needs from each process's random_states_<rank>.pkl to draw the same numbers again.
_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed exactly (incomplete, another launch configuration, no RNG state)."""


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with ``training_state.json``) in ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if CHECKPOINT_PATTERN.match(path.name) and (path / TRAINING_STATE_NAME).is_file():
            state = json.loads((path / TRAINING_STATE_NAME).read_text())
            found.append((state["completed_steps"], path))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator: Any, output_dir: str, name: str, state: dict[str, Any], limit: int | None
) -> Path:
    """``accelerator.save_state`` into ``checkpoints/.tmp-<name>``, then rename to ``checkpoints/<name>``.

    The rename happens after every process has written its part, and ``training_state.json`` is the last
    file written: a crash at any moment leaves either the complete new checkpoint or only an ignored
    ``.tmp-`` folder beside the previous complete one. ``limit`` keeps the newest N checkpoints.
    """
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / TRAINING_STATE_NAME, "w") as fh:
            json.dump(state, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # e.g. re-saving the same step after a resume
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if limit:
            for stale in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(resume_from: str, output_dir: str | os.PathLike) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names: ``"latest"`` (None when there is none yet) or a path."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    checkpoint = Path(resume_from)
    if not (checkpoint / TRAINING_STATE_NAME).is_file():
        raise CheckpointError(
            f"{checkpoint} is not a complete checkpoint (no {TRAINING_STATE_NAME}); "
            f"complete ones: {[str(p) for p in list_checkpoints(output_dir)]}"
        )
    return checkpoint


def check_random_states(checkpoint: Path, process_index: int) -> str | None:
    """Why ``checkpoint``'s RNG state for this process cannot be restored, or None when it can.

    ``load_state`` itself only logs "Could not load random states" at info level and goes on, which would
    quietly change every later dropout mask; this reads the file first with Accelerate's own safe loader
    (``weights_only``), so nothing in it runs.
    """
    from accelerate.utils import load

    path = checkpoint / f"random_states_{process_index}.pkl"
    if not path.is_file():
        return f"{path} is missing"
    try:
        states = load(path)
    except Exception as err:  # any unreadable or unsafe pickle: the reason is in the message
        return f"{path} cannot be read safely ({type(err).__name__}: {str(err).splitlines()[0]})"
    missing = [key for key in _RNG_KEYS if not isinstance(states, dict) or key not in states]
    if missing:
        return f"{path} lacks {missing}"
    return None


def load_checkpoint(
    accelerator: Any, checkpoint: Path, expected: dict[str, Any], allow_rng_state_loss: bool = False
) -> dict[str, Any]:
    """Restore ``checkpoint`` into the prepared objects; returns its ``training_state.json``.

    Args:
        expected: ``{"num_processes", "total_batch_size"}`` of this run; a checkpoint written with others
            would continue on another data order, so it is refused.
        allow_rng_state_loss: resume even when the RNG state cannot be restored (a loud warning instead of
            an error): the run continues, no longer bit-exact with an uninterrupted one.
    """
    import warnings

    state = json.loads((checkpoint / TRAINING_STATE_NAME).read_text())
    for key in ("num_processes", "total_batch_size"):
        if state[key] != expected[key]:
            raise CheckpointError(
                f"{checkpoint} was written by {state['num_processes']} process(es) with a total batch of "
                f"{state['total_batch_size']}; this run has {expected['num_processes']} and "
                f"{expected['total_batch_size']}. Resume with the same launch configuration to continue exactly."
            )
    problem = check_random_states(checkpoint, accelerator.process_index)
    if problem is not None:
        message = (
            f"cannot restore the random number generators from {checkpoint}: {problem}. Resuming would "
            "draw other dropout masks than the interrupted run"
        )
        if not allow_rng_state_loss:
            raise CheckpointError(
                message + "; pass --allow_rng_state_loss to resume anyway, not bit-exactly."
            )
        warnings.warn(message + " (--allow_rng_state_loss: resuming anyway, not bit-exactly).", stacklevel=2)
    accelerator.load_state(str(checkpoint))
    return state


__all__ = [
    "CHECKPOINT_PATTERN",
    "TRAINING_STATE_NAME",
    "CheckpointError",
    "check_random_states",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]
