"""Every user-facing flag of training/train.py changes what the run does: a few tiny runs check several flags
each (what a flag does is read from the outputs, so a flag that were ignored would fail its assertion).

Here also: --report_to and --logging_steps (Accelerate's TensorBoard tracker over a fake tensorboardX package),
--dataset_config_name and --image_column (a local dataset with two configurations), --eval_meteor.
Flags covered elsewhere: --config, --train_file, --output_dir, --embedding_cache_dir, --num_train_epochs,
--eval_steps (test_train.py); --model_name_or_path, --freeze_language_model, --freeze_vision, --on_bad_image,
--dataset_name, --streaming, --caption_column, --max_train_steps (test_train.py); --gradient_accumulation_steps,
--checkpointing_steps, --stop_after_steps, --resume_from_checkpoint, --push_to_hub, --hub_model_id, --hub_token,
--hub_private_repo (slow tests in test_train.py and test_kill_resume.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_tokenizer, tiny_text_config, tiny_vision_config
from safetensors.torch import load_file

from modeling_clipcap import checkpointing
from modeling_clipcap.data import CaptionDataError

sys.path.insert(0, str(REPO_ROOT / "training"))

import synthetic_data  # noqa: E402
import train  # noqa: E402
from test_train import _argv, _losses, _write_preset  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """test_train.py's set-up: a tiny preset, 12 training + 4 validation synthetic images."""
    root = tmp_path_factory.mktemp("flags_setup")
    synthetic_data.write_to_disk(root / "data", sizes={"train": 12, "validation": 4}, show_progress=False)
    preset = _write_preset(root / "preset", len(build_tiny_tokenizer()), dropout=True)
    return {"root": root, "preset": preset, "data": root / "data"}


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture()
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; a run in another precision needs it cleared (before and after)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_model_data_schedule_generation_and_checkpoint_flags(setup, tmp_path, fresh_accelerator_state):
    out = tmp_path / "run"
    argv = _argv(setup, out, "--max_train_steps", "3", "--seed", "3")
    argv += [
        "--mapping_type",
        "transformer",
        "--prefix_length",
        "3",
        "--clip_length",
        "2",
        "--normalize_prefix",
    ]
    argv += ["--max_train_samples", "5", "--max_eval_samples", "2"]
    argv += [
        "--max_caption_length",
        "5",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "1",
    ]
    argv += ["--learning_rate", "0.003", "--lr_scheduler_type", "constant", "--num_warmup_steps", "0"]
    argv += ["--num_beams", "2", "--max_new_tokens", "4", "--eval_steps", "2"]
    argv += ["--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--logging_steps", "1"]
    argv += ["--mixed_precision", "bf16", "--embedding_batch_size", "2", "--preprocessing_num_workers", "0"]
    summary = train.main(argv)

    config = json.loads((out / "config.json").read_text())
    assert (config["mapping_type"], config["prefix_length"], config["clip_length"]) == ("transformer", 3, 2)
    assert config["normalize_prefix"] is True
    stats = summary["embedding_cache"]
    assert (
        stats["Encoding train images"]["encoded"] == 5 and stats["Encoding validation images"]["encoded"] == 2
    )
    steps = [r for r in _log(out) if "loss" in r]
    assert all(r["tokens"] <= 2 * 5 for r in steps)  # 2 captions of at most 5 tokens a step
    assert [r["lr"] for r in steps] == pytest.approx([0.003] * 3)  # constant, no warm-up
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_new_tokens"]) == (2, 4)
    assert [r["step"] for r in _log(out) if "eval_loss" in r] == [2, 3]  # --eval_steps 2, then the final one
    assert [p.name for p in checkpointing.list_checkpoints(out)] == [
        "step_3"
    ]  # a checkpoint a step, the newest kept
    assert summary["mixed_precision"] == "bf16"
    assert (
        "eval_METEOR" not in summary["final_metrics"] and "eval_CIDEr" in summary["final_metrics"]
    )  # default


def test_seed_weight_decay_and_grad_norm_each_change_the_weights(setup, tmp_path):
    common = ["--max_train_steps", "2", "--eval_steps", "0", "--max_eval_samples", "1", "--lr_scheduler_type"]
    common += ["constant", "--num_warmup_steps", "0"]
    cache = tmp_path / "cache"

    def weights(name: str, *extra: str) -> dict[str, torch.Tensor]:
        train.main(_argv(setup, tmp_path / name, *common, *extra, cache=cache))
        return load_file(tmp_path / name / "model.safetensors")

    base = weights("base")
    assert all(torch.equal(base[k], v) for k, v in weights("again").items())  # runs repeat exactly
    for name, extra in {
        "seed": ["--seed", "5"],
        "weight_decay": ["--weight_decay", "50"],
        "max_grad_norm": ["--max_grad_norm", "1e-6"],
    }.items():
        other = weights(name, *extra)
        assert any(not torch.equal(base[k], other[k]) for k in base), f"--{name} changed nothing"


def test_accumulation_splits_and_no_embedding_cache(setup, tmp_path):
    """--train_split / --validation_split swap the roles of the folders; --gradient_accumulation_steps 2
    halves the optimizer steps of an epoch; --no_embedding_cache encodes training images in every step."""
    out = tmp_path / "swapped"
    argv = _argv(setup, out, "--train_split", "validation", "--validation_split", "train")
    argv += [
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
    ]
    argv += ["--no_embedding_cache", "--max_eval_samples", "3"]
    summary = train.main(argv)
    assert "Encoding train images" not in summary["embedding_cache"]  # read from pixels at every step
    assert summary["embedding_cache"]["Encoding validation images"]["encoded"] == 3
    assert summary["training_data"].startswith(f"{setup['data']} (4 images, ")  # the validation folder's 4
    num_captions = int(summary["training_data"].split(", ")[-1].split()[0])
    assert summary["completed_steps"] == math.ceil(math.ceil(num_captions / 2) / 2)


def test_metadata_file_with_image_dirs(setup, tmp_path):
    """--train_file / --validation_file as JSONL files away from their images: --image_dir and
    --validation_image_dir say where the images are (each folder holds only its own split's files)."""
    meta = tmp_path / "meta"
    meta.mkdir()
    shutil.copy(setup["data"] / "train" / "metadata.jsonl", meta / "train.jsonl")
    shutil.copy(setup["data"] / "validation" / "metadata.jsonl", meta / "val.jsonl")
    argv = ["--config", str(setup["preset"]), "--train_file", str(meta / "train.jsonl")]
    argv += ["--image_dir", str(setup["data"] / "train"), "--validation_file", str(meta / "val.jsonl")]
    argv += ["--validation_image_dir", str(setup["data"] / "validation"), "--output_dir", str(tmp_path / "o")]
    argv += ["--embedding_cache_dir", str(tmp_path / "cache"), "--max_train_steps", "1"]
    assert shutil.which("java"), (
        "this test needs java on PATH: --eval_meteor runs pycocoevalcap's METEOR (meteor-1.5.jar). Install a Java "
        "runtime (apt-get install default-jre-headless; .ci/run installs one)."
    )
    summary = train.main(argv + ["--eval_meteor"])
    # --eval_meteor: METEOR (pycocoevalcap's java scorer) joins the validation
    assert 0 <= summary["final_metrics"]["eval_METEOR"] <= 1
    assert 0 <= summary["final_metrics"]["eval_CIDEr"] <= 10
    assert summary["embedding_cache"]["Encoding train images"]["encoded"] == 12
    assert summary["embedding_cache"]["Encoding validation images"]["encoded"] == 4
    # without --validation_image_dir the validation files are looked up in --image_dir (the train folder)
    looked_up = re.escape(str(setup["data"] / "train" / "validation_000000.png"))
    missing = rf"val\.jsonl: 4 of 4 images are missing.*{looked_up}"
    with pytest.raises(CaptionDataError, match=rf"(?s){missing}: file does not exist"):
        train.main(
            [a for a in argv if a not in (str(setup["data"] / "validation"), "--validation_image_dir")]
        )


def test_pretrained_parts_tokenizer_and_image_processor_flags(tmp_path, setup):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, GPT2LMHeadModel

    tokenizer = build_tiny_tokenizer(tmp_path / "gpt2")
    GPT2LMHeadModel(tiny_text_config(len(tokenizer) + 8)).save_pretrained(tmp_path / "gpt2")
    CLIPVisionModelWithProjection(tiny_vision_config(projection_dim=20)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    odd = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 28, "width": 28})
    odd.save_pretrained(tmp_path / "odd_processor")
    bigger = build_tiny_tokenizer(tmp_path / "tokenizer")
    bigger.add_tokens(["<shape>"])
    bigger.save_pretrained(tmp_path / "tokenizer")

    argv = ["--train_file", "unused", "--vision_model_name_or_path", str(tmp_path / "clip")]
    argv += ["--text_model_name_or_path", str(tmp_path / "gpt2"), "--prefix_length", "2"]
    model, processor = train.build_model_and_processor(train.parse_args(argv))
    assert model.config.vision_config.projection_dim == 20 and model.config.prefix_length == 2
    assert model.config.text_config.vocab_size == len(tokenizer) + 8
    assert processor.image_processor.crop_size["height"] == 32  # CLIP's own processor by default
    assert len(processor.tokenizer) == len(tokenizer)
    argv += [
        "--image_processor_name",
        str(tmp_path / "odd_processor"),
        "--tokenizer_name",
        str(tmp_path / "tokenizer"),
    ]
    _, processor = train.build_model_and_processor(train.parse_args(argv))
    assert processor.image_processor.crop_size["height"] == 28
    assert len(processor.tokenizer) == len(tokenizer) + 1


def test_allow_rng_state_loss_is_needed_to_resume_without_rng_state(setup, tmp_path):
    out = tmp_path / "run"
    argv = _argv(setup, out, "--max_train_steps", "3", "--eval_steps", "0", "--max_eval_samples", "1")
    train.main(argv + ["--stop_after_steps", "1"])
    (checkpoint,) = checkpointing.list_checkpoints(out)
    (checkpoint / "random_states_0.pkl").unlink()
    with pytest.raises(ValueError, match="random_states_0.pkl.*--allow_rng_state_loss"):
        train.main(argv + ["--resume_from_checkpoint", "latest"])
    with pytest.warns(UserWarning, match="not bit-exactly"):
        summary = train.main(argv + ["--resume_from_checkpoint", "latest", "--allow_rng_state_loss"])
    assert summary["completed_steps"] == 3 and len(_losses(out)) == 3


# A stand-in for the tensorboardX package (Accelerate's TensorBoard tracker falls back to it when torch's
# tensorboard module cannot import): every writer call becomes one JSON line in $FAKE_TENSORBOARD_LOG.
FAKE_TENSORBOARDX = """
import json, os

class SummaryWriter:
    def __init__(self, logdir, **kwargs):
        self._write("init", str(logdir))

    def _write(self, *call):
        with open(os.environ["FAKE_TENSORBOARD_LOG"], "a") as fh:
            fh.write(json.dumps(call) + "\\n")

    def add_hparams(self, hparams, metric_dict=None, **kwargs):
        self._write("hparams", dict(hparams))

    def add_scalar(self, tag, value, global_step=None, **kwargs):
        self._write("scalar", tag, value, global_step)

    def add_text(self, tag, text, global_step=None, **kwargs):
        self._write("text", tag, text, global_step)

    def add_scalars(self, tag, values, global_step=None, **kwargs):
        self._write("scalars", tag, values, global_step)

    def flush(self):
        pass

    def close(self):
        self._write("close")
"""


def test_report_to_and_logging_steps_feed_the_tracker(setup, tmp_path):
    """--report_to tensorboard goes through Accelerate's real TensorBoard tracker (a fake tensorboardX
    package records the writer calls) and gets the run's flags, the training loss every --logging_steps
    steps, and the final validation; without the tracker's package the run stops with a clear error."""
    import subprocess

    from conftest import subprocess_env

    argv = _argv(setup, tmp_path / "plain", "--max_train_steps", "1", "--report_to", "tensorboard")
    with pytest.raises(ValueError, match="--report_to tensorboard: its package is not installed"):
        train.main(argv)  # neither tensorboard nor tensorboardX is installed in the test environments

    fake = tmp_path / "fake_site"
    (fake / "tensorboardX").mkdir(parents=True)
    (fake / "tensorboardX" / "__init__.py").write_text(FAKE_TENSORBOARDX)
    (fake / "tensorboardX-0.0.dist-info").mkdir()
    (fake / "tensorboardX-0.0.dist-info" / "METADATA").write_text("Name: tensorboardX\nVersion: 0.0\n")
    calls_file, out = tmp_path / "calls.jsonl", tmp_path / "tracked"
    env = subprocess_env(tmp_path, PYTHONPATH=str(fake), FAKE_TENSORBOARD_LOG=str(calls_file))
    argv = _argv(setup, out, "--max_train_steps", "5", "--logging_steps", "2", "--report_to", "tensorboard")
    argv += ["--max_eval_samples", "2", "--learning_rate", "0.003"]
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / "train.py"), *argv],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert calls[0][0] == "init" and calls[0][1].startswith(str(out))  # logs under --output_dir
    (hparams,) = [c[1] for c in calls if c[0] == "hparams"]
    assert hparams["learning_rate"] == 0.003 and hparams["logging_steps"] == 2
    assert [c[3] for c in calls if c[:2] == ["scalar", "loss"]] == [2, 4]  # every 2nd of 5 steps
    logged = {r["step"]: r["loss"] for r in _log(out) if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5]  # train_log.jsonl keeps every step
    assert [c[2] for c in calls if c[:2] == ["scalar", "loss"]] == pytest.approx([logged[2], logged[4]])
    assert [c[3] for c in calls if c[:2] == ["scalar", "eval_loss"]] == [5]  # the final validation
    assert calls[-1] == ["close"]


def test_dataset_config_name_and_image_column(setup, tmp_path):
    """--dataset_name with two configurations (README.md ``configs``): --dataset_config_name picks the
    second one (3 images, not the first one's 5), whose image column --image_column names."""
    import datasets

    rows = [
        json.loads(line) for line in (setup["data"] / "train" / "metadata.jsonl").read_text().splitlines()
    ]
    import uuid

    # datasets caches a local folder's table under the folder's name (not its path): a unique name per run
    folder = tmp_path / f"hf_dataset_{uuid.uuid4().hex[:8]}"
    for name, part in {"large": rows[:5], "small": rows[5:8]}.items():
        (folder / name).mkdir(parents=True)
        table = datasets.Dataset.from_dict(
            {
                "picture": [str(setup["data"] / "train" / r["file_name"]) for r in part],
                "text": [r["captions"][0] for r in part],
            }
        ).cast_column("picture", datasets.Image())
        table.to_parquet(str(folder / name / "train.parquet"))
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: large/train.parquet\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/train.parquet\n---\n"
    )
    argv = ["--config", str(setup["preset"]), "--dataset_name", str(folder), "--dataset_config_name", "small"]
    argv += ["--image_column", "picture", "--caption_column", "text", "--max_train_steps", "1"]
    argv += ["--output_dir", str(tmp_path / "o"), "--embedding_cache_dir", str(tmp_path / "cache")]
    summary = train.main(argv)
    assert summary["embedding_cache"]["Encoding train images"]["encoded"] == 3  # the "small" configuration
    assert summary["training_data"].startswith(f"{folder} (3 images, 3 captions")
    # the default image column does not exist here
    with pytest.raises(
        CaptionDataError, match=r"no column 'image' \(image_column\); columns are \['picture', 'text'\]"
    ):
        train.main([a for a in argv if a not in ("--image_column", "picture")])
