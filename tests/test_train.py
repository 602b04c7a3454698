"""training/train.py end to end with tiny models on the synthetic shapes data.

Fast tests call ``train.main(argv)`` in this process; the ``slow`` ones launch real processes
(``accelerate launch``, two gloo ranks, kill-free stop + resume, a push to the local Hub emulator).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_tokenizer, subprocess_env, tiny_clipcap_config
from safetensors.torch import load_file

from modeling_clipcap import checkpointing

sys.path.insert(0, str(REPO_ROOT / "training"))

import synthetic_data  # noqa: E402
import train  # noqa: E402

TRAIN_SCRIPT = str(REPO_ROOT / "training" / "train.py")


# ------------------------------------------------------------------------------------------------ fixtures


def _write_preset(folder: Path, tokenizer_vocab: int, dropout: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(folder)
    config = tiny_clipcap_config(tokenizer_vocab).to_dict()
    if not dropout:  # two processes must draw the same dropout masks as one: none at all
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            config["text_config"][key] = 0.0
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 12, "num_beams": 1}))
    (folder / "training_args.json").write_text(
        json.dumps(
            {
                "learning_rate": 1e-2,
                "num_warmup_steps": 2,
                "per_device_train_batch_size": 8,
                "max_caption_length": 24,
                "num_train_epochs": 1,
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny preset (with and without dropout), 12 training + 4 validation synthetic images."""
    root = tmp_path_factory.mktemp("train_setup")
    vocab = len(build_tiny_tokenizer())
    synthetic_data.write_to_disk(root / "data", sizes={"train": 12, "validation": 4}, show_progress=False)
    return {
        "root": root,
        "preset": _write_preset(root / "preset", vocab, dropout=True),
        "preset_nodrop": _write_preset(root / "preset_nodrop", vocab, dropout=False),
        "data": root / "data",
        "num_train_images": 12,
    }


def _argv(setup, out: Path, *extra: str, preset: str = "preset", cache: Path | None = None) -> list[str]:
    return [
        "--config",
        str(setup[preset]),
        "--train_file",
        str(setup["data"]),
        "--output_dir",
        str(out),
        "--embedding_cache_dir",
        str(cache or out.parent / f"{out.name}-cache"),
        *extra,
    ]


def _losses(out: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (out / "train_log.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(tmp, **extra)


def _run(cmd: list[str], env: dict[str, str], timeout: int = 480) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ fast


def test_preset_values_are_defaults_and_flags_win(setup):
    args = train.parse_args(_argv(setup, setup["root"] / "o", "--learning_rate", "0.5"))
    assert args.learning_rate == 0.5  # flag beats preset (1e-2)
    assert args.per_device_train_batch_size == 8  # from the preset
    assert (
        args.weight_decay == train.build_parser().get_default("weight_decay") == 0.0
    )  # neither: built-in default
    args = train.parse_args(_argv(setup, setup["root"] / "o", "--freeze_language_model"))
    assert args.freeze_language_model is True
    args = train.parse_args(_argv(setup, setup["root"] / "o", "--freeze_language_model", "false"))
    assert args.freeze_language_model is False


def test_bad_arguments_fail_clearly(setup, capsys):
    with pytest.raises(FileNotFoundError, match="no such preset"):
        train.parse_args(["--config", str(setup["root"] / "missing"), "--train_file", "x"])
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(setup["preset"])])  # no data
    assert "--train_file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(_argv(setup, setup["root"] / "o", "--checkpointing_steps", "often"))


def test_training_loss_falls_output_loads_and_cache_is_reused(setup, tmp_path):
    from transformers import AutoModel, AutoProcessor

    cache = tmp_path / "cache"
    out = tmp_path / "run"
    summary = train.main(_argv(setup, out, "--num_train_epochs", "6", "--eval_steps", "20", cache=cache))
    losses = _losses(out)
    assert len(losses) == summary["completed_steps"] == 6 * 7  # 55 captions / batch 8 -> 7 steps an epoch
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    # each unique image encoded exactly once
    assert summary["embedding_cache"]["Encoding train images"]["encoded"] == setup["num_train_images"]
    assert summary["embedding_cache"]["Encoding validation images"]["encoded"] == 4
    assert "eval_CIDEr" in summary["final_metrics"] and "eval_loss" in summary["final_metrics"]

    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    from PIL import Image

    images = [Image.open(p) for p in sorted((setup["data"] / "validation").glob("*.png"))]
    ids = model.generate(**processor(images=images, return_tensors="pt"))
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    assert len(captions) == 4 and all(isinstance(c, str) and c for c in captions)
    assert ids.shape[1] <= 12  # the preset's generation config travelled with the model
    card = (out / "README.md").read_text()
    assert "learning_rate" in card and str(setup["data"]) in card

    # A second run with the same encoder and data re-encodes nothing.
    summary2 = train.main(_argv(setup, tmp_path / "run2", "--max_train_steps", "1", cache=cache))
    stats = summary2["embedding_cache"]
    assert stats["Encoding train images"] == {**stats["Encoding train images"], "encoded": 0, "reused": 12}
    assert stats["Encoding validation images"]["encoded"] == 0


def test_freeze_language_model_trains_only_the_mapper(setup, tmp_path):
    from modeling_clipcap import ClipCapForConditionalGeneration

    # A starting checkpoint whose GPT-2 weights we know.
    torch.manual_seed(0)
    start = tmp_path / "start"
    ClipCapForConditionalGeneration(tiny_clipcap_config(len(build_tiny_tokenizer(start)))).save_pretrained(
        start
    )
    argv = _argv(setup, tmp_path / "frozen", "--model_name_or_path", str(start), "--freeze_language_model")
    argv += ["--max_train_steps", "3"]

    # No weight gradients reach GPT-2 in a forward/backward on a training batch.
    model, processor = train.build_model_and_processor(train.parse_args(argv))
    model.train()
    from modeling_clipcap.data import CaptionCollator

    batch = CaptionCollator(processor.tokenizer, 24)(
        [{"caption": "a small red circle.", "image_embeds": torch.randn(24)} for _ in range(2)]
    )
    model(**batch).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.language_model.parameters())
    assert all(p.grad is not None for p in model.mapping_network.parameters())
    assert not model.language_model.training  # frozen GPT-2 stays in eval mode (no dropout)

    summary = train.main(argv)
    assert summary["optimized_modules"] == ["mapping_network"]
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.mapping_network.parameters())
    before, after = (
        load_file(start / "model.safetensors"),
        load_file(tmp_path / "frozen" / "model.safetensors"),
    )
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mapping_network.") for k in changed)


def test_checkpoint_write_is_atomic(setup, tmp_path):
    """A crash in the middle of saving leaves the previous checkpoint as the latest, loadable one."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    out = tmp_path / "ckpt"
    first = checkpointing.save_checkpoint(
        accelerator, str(out), "step_2", {"completed_steps": 2, "epoch": 0, "batches_in_epoch": 2}, None
    )
    saved = model.weight.detach().clone()
    original_save_state = accelerator.save_state

    def crashing_save_state(path):
        original_save_state(path)  # files written...
        raise KeyboardInterrupt("killed while writing the checkpoint")  # ...then the process dies

    accelerator.save_state = crashing_save_state
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(accelerator, str(out), "step_4", {"completed_steps": 4}, None)
    assert checkpointing.list_checkpoints(out) == [first]  # the half-written step_4 is not a checkpoint
    assert (out / "checkpoints" / ".tmp-step_4").exists() and not (out / "checkpoints" / "step_4").exists()
    accelerator.load_state(str(first))
    assert torch.equal(model.weight, saved)


def test_bad_images_fail_by_default_and_are_reported_with_skip(setup, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    (data / "train" / "train_000003.png").write_bytes(b"<html>not an image</html>")
    argv = ["--config", str(setup["preset"]), "--train_file", str(data), "--output_dir", str(tmp_path / "o")]
    argv += ["--embedding_cache_dir", str(tmp_path / "cache"), "--max_train_steps", "1"]
    with pytest.raises(ValueError, match="train_000003.png"):
        train.main(argv)
    summary = train.main(argv + ["--on_bad_image", "skip"])
    assert summary["skipped_images"] == 1
    report = json.loads((tmp_path / "o" / "skipped_images.json").read_text())
    assert report["count"] == 1 and report["images"][0][0].endswith("train_000003.png")
    assert summary["embedding_cache"]["Encoding train images"]["encoded"] == 11


def test_script_reports_bad_data_without_a_traceback(setup, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    (data / "train" / "train_000002.png").write_bytes(b"")
    argv = ["--config", str(setup["preset"]), "--train_file", str(data), "--output_dir", str(tmp_path / "o")]
    argv += ["--embedding_cache_dir", str(tmp_path / "cache"), "--max_train_steps", "1"]
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / "train.py"), *argv],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.py: error:" in proc.stderr and "train_000002.png" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unfrozen_vision_trains_from_pixels_without_a_cache(setup, tmp_path):
    out = tmp_path / "vision"
    argv = ["--config", str(setup["preset"]), "--train_file", str(setup["data"]), "--output_dir", str(out)]
    argv += ["--freeze_vision", "false"]
    summary = train.main(argv + ["--embedding_cache_dir", str(tmp_path / "cache"), "--max_train_steps", "2"])
    assert summary["embedding_cache"] == {}  # nothing cached: CLIP runs inside the training step
    assert "vision_model" in summary["optimized_modules"]
    assert "eval_loss" in summary["final_metrics"] and "eval_CIDEr" in summary["final_metrics"]
    from modeling_clipcap import ClipCapForConditionalGeneration

    assert ClipCapForConditionalGeneration.from_pretrained(out).config.freeze_vision is False
    # the same run with the tower frozen keeps its initial weights: the unfrozen one changed every matrix
    frozen = tmp_path / "frozen"
    argv_frozen = [
        "--config",
        str(setup["preset"]),
        "--train_file",
        str(setup["data"]),
        "--output_dir",
        str(frozen),
    ]
    train.main(argv_frozen + ["--embedding_cache_dir", str(tmp_path / "cache"), "--max_train_steps", "2"])
    trained, kept = load_file(out / "model.safetensors"), load_file(frozen / "model.safetensors")
    vision = [k for k in kept if "vision_model." in k and kept[k].ndim == 2]
    assert vision and all(not torch.equal(trained[k], kept[k]) for k in vision)


def test_streaming_reads_a_dataset_lazily_and_encodes_on_the_fly(setup, tmp_path):
    import shutil

    # The last training image is broken: a run that read the stream up front would fail on it; a lazy one
    # decodes only the images of the batches it trains on.
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    rows = (data / "train" / "metadata.jsonl").read_text().splitlines()
    (data / "train" / json.loads(rows[-1])["file_name"]).write_bytes(b"not an image")
    out = tmp_path / "stream"
    argv = ["--config", str(setup["preset"]), "--dataset_name", str(data), "--streaming"]
    argv += ["--caption_column", "captions", "--max_train_steps", "3", "--output_dir", str(out)]
    summary = train.main(argv + ["--embedding_cache_dir", str(tmp_path / "cache")])
    assert summary["completed_steps"] == 3 and "streaming" in summary["training_data"]
    assert "Encoding train images" not in summary["embedding_cache"]  # no up-front pass over the stream
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["clipcap-coco-mlp", "clipcap-coco-transformer"])
def test_paper_presets(name):
    """The two paper recipes: every training argument is known, and the model fields build a model."""
    from conftest import tiny_text_config, tiny_vision_config
    from transformers import GenerationConfig

    from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration

    args = train.parse_args(["--config", name, "--train_file", "unused.json"])
    assert args.learning_rate == 2e-5 and args.num_warmup_steps == 5000
    assert args.per_device_train_batch_size == 40 and args.num_train_epochs == 10
    assert args.vision_model_name_or_path and args.text_model_name_or_path
    fields = json.loads((args.preset / "config.json").read_text())
    fields.pop("model_type")
    config = ClipCapConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(300, n_embd=64), **fields
    )
    model = ClipCapForConditionalGeneration(config)
    prefix, _ = model.get_prefix(image_embeds=torch.randn(2, 24))
    expected = {
        "clipcap-coco-mlp": (10, "mlp", False),
        "clipcap-coco-transformer": (40, "transformer", True),
    }[name]
    assert (prefix.shape[1], config.mapping_type, config.freeze_language_model) == expected
    assert GenerationConfig.from_pretrained(args.preset).num_beams == 5
    assert "$hyperparameters" in (args.preset / "README.md").read_text()


def test_every_preset_has_the_one_schema():
    """Every preset folder of hub_configs/ (training and conversion alike) holds the same files, read by
    modeling_clipcap.presets; its training_args.json is train.py flags (train.py --config accepts it), its
    README.md is the card template of a trained model and, where preset.json names a released checkpoint,
    conversion_card.md that of the converted one (one folder per released checkpoint, whose earlier
    conversion names still find it)."""
    from modeling_clipcap.presets import PRESET_ALIASES, find_preset, hub_configs_dir, read_preset

    names = sorted(p.name for p in hub_configs_dir().iterdir() if (p / "config.json").is_file())
    expected = {"clipcap-coco-mlp", "clipcap-coco-transformer", "conceptual-mlp", "clipcap-synthetic-tiny"}
    assert expected <= set(names)
    released = {}
    for name in names:
        folder = hub_configs_dir() / name
        assert not (folder / "model_card.md").exists(), name  # one card-template name
        for file in ("config.json", "generation_config.json", "training_args.json", "README.md"):
            assert (folder / file).is_file(), f"{name}/{file}"
        preset = read_preset(folder)
        assert preset["config"]["model_type"] == "clipcap" and preset["card_template"].startswith("---\n"), (
            name
        )
        assert "$hyperparameters" in preset["card_template"], name  # a trained model's card
        if preset["preset"]:
            assert (
                preset["preset"]["image_embed_dim"]
                and "${source_sha256}" in preset["conversion_card_template"]
            )
            assert released.setdefault(preset["preset"]["original_file"], name) == name, (
                "one folder per checkpoint"
            )
        args = train.parse_args(["--config", name, "--train_file", "unused"])
        assert args.preset == folder.resolve()
        for key, value in preset["training_args"].items():
            if key != "_comment" and not str(value).startswith("./"):
                assert getattr(args, key) == value, (name, key)
    assert set(released) == {"coco_weights.pt", "conceptual_weights.pt", "transformer_weights.pt"}
    for alias, name in PRESET_ALIASES.items():
        assert find_preset(alias) == find_preset(name) == (hub_configs_dir() / name).resolve()
    assert (
        read_preset(hub_configs_dir() / "clipcap-coco-mlp")["preset"]["original_training"]["batch_size"] == 40
    )
    assert read_preset(hub_configs_dir() / "clipcap-synthetic-tiny")["demo"]["recipe"]  # other *.json by stem


def test_a_model_folder_is_never_taken_for_a_preset(tmp_path, monkeypatch):
    """``--config clipcap-coco-mlp`` beside a converted or trained ``clipcap-coco-mlp/`` (it has weights)
    still finds the preset; a folder without weights is a preset and wins over the shipped one."""
    from modeling_clipcap.presets import find_preset, hub_configs_dir

    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "clipcap-coco-mlp"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "clipcap"}')
    (model_dir / "model.safetensors").write_bytes(b"")
    assert find_preset("clipcap-coco-mlp") == (hub_configs_dir() / "clipcap-coco-mlp").resolve()
    (model_dir / "model.safetensors").unlink()
    assert find_preset("clipcap-coco-mlp") == model_dir.resolve()


def test_data_flags_reach_the_library_as_keywords():
    """train.py hands the data flags to training_data.build_datasets / read_splits as keyword arguments of the
    same names: every keyword that is a flag is passed (the mapper's input comes from the model)."""
    import inspect

    from modeling_clipcap.training_data import build_datasets, read_splits

    flags = set(vars(train.build_parser().parse_args(["--train_file", "x"])))
    keywords = {
        name
        for function in (build_datasets, read_splits)
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY
    }
    assert set(train.DATA_ARGUMENTS) == (keywords & flags) - {"mapping_input"}
    from modeling_clipcap.shards import build_train_stream

    stream_keywords = {
        name
        for name, parameter in inspect.signature(build_train_stream).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY
    }
    assert set(train.STREAM_ARGUMENTS) == (stream_keywords & flags) - {"mapping_input"}


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO_ROOT / "hub_configs" / "accelerate"
    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in folder.glob("*.yaml")}
    assert kinds == {
        "single_gpu": "DistributedType.NO",
        "multi_gpu": "DistributedType.MULTI_GPU",
        "deepspeed_zero2": "DistributedType.DEEPSPEED",
    }


# ------------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_accelerate_launch_trains_and_saves(setup, tmp_path):
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN_SCRIPT]
    proc = _run(cmd + _argv(setup, out, "--num_train_epochs", "3"), _env(tmp_path))
    assert "Training summary" in proc.stdout
    losses = _losses(out)
    assert len(losses) == 21 and losses[-1] < 0.8 * losses[0]
    results = json.loads((out / "train_results.json").read_text())
    assert results["num_processes"] == 1
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()


@pytest.mark.slow
def test_stop_and_resume_gives_the_same_weights(setup, tmp_path):
    """Stopped mid-epoch (with dropout, accumulation and a short last group) in the first epoch, resumed from
    ``latest`` and stopped again mid-way through the second epoch, then resumed to the end: the same per-step
    losses and final weights as one uninterrupted run (a resume inside a later epoch must reshuffle that epoch
    as the uninterrupted run did: Accelerate 1.12's skipping loader would start it at epoch 0)."""
    common = ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2"]
    common += [
        "--max_train_steps",
        "14",
        "--checkpointing_steps",
        "4",
        "--eval_steps",
        "4",
    ]  # 10 steps an epoch
    env = _env(tmp_path)
    cache = tmp_path / "cache"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run([sys.executable, TRAIN_SCRIPT, *_argv(setup, full, *common, cache=cache)], env)
    _run(
        [
            sys.executable,
            TRAIN_SCRIPT,
            *_argv(setup, resumed, *common, "--stop_after_steps", "6", cache=cache),
        ],
        env,
    )
    assert [p.name for p in checkpointing.list_checkpoints(resumed)] == ["step_4", "step_6"]
    assert not (resumed / "model.safetensors").exists()
    again = ("--resume_from_checkpoint", "latest", "--stop_after_steps", "12")  # 4 batches into epoch 1
    proc = _run([sys.executable, TRAIN_SCRIPT, *_argv(setup, resumed, *common, *again, cache=cache)], env)
    assert "step_6" in proc.stdout + proc.stderr
    assert [p.name for p in checkpointing.list_checkpoints(resumed)][-1] == "step_12"
    assert not (resumed / "model.safetensors").exists()
    proc = _run(
        [
            sys.executable,
            TRAIN_SCRIPT,
            *_argv(setup, resumed, *common, "--resume_from_checkpoint", "latest", cache=cache),
        ],
        env,
    )
    assert "step_12" in proc.stdout + proc.stderr
    assert _losses(resumed) == pytest.approx(_losses(full), abs=1e-6)  # steps 1-6, 7-12, 13-14
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(setup, tmp_path):
    common = ["--max_train_steps", "6", "--checkpointing_steps", "3"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    _run(
        launch
        + ["--cpu", "--num_processes", "1", TRAIN_SCRIPT]
        + _argv(
            setup, one, *common, "--per_device_train_batch_size", "8", preset="preset_nodrop", cache=cache
        ),
        _env(tmp_path),
    )
    _run(
        launch
        + ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), TRAIN_SCRIPT]
        + _argv(
            setup, two, *common, "--per_device_train_batch_size", "4", preset="preset_nodrop", cache=cache
        ),
        _env(tmp_path, ACCELERATE_USE_CPU="true"),
    )
    results = json.loads((two / "train_results.json").read_text())
    assert results["num_processes"] == 2 and results["total_batch_size"] == 8
    # both ranks wrote their RNG state into the checkpoint
    assert sorted(p.name for p in (two / "checkpoints" / "step_3").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 6
    assert max(abs(x - y) for x, y in zip(l1, l2)) <= 1e-4, (l1, l2)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


@pytest.mark.slow
def test_push_to_hub_round_trip_without_the_package(setup, tmp_path, hub_server):
    repo_id = f"{hub_server.user}/clipcap-tiny"
    out = tmp_path / "pushed"
    env = hub_server.env({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    del env["HF_TOKEN"]  # the token comes from --hub_token alone (the emulator refuses writes without it)
    _run(
        [sys.executable, TRAIN_SCRIPT, *_argv(setup, out, "--max_train_steps", "5")]
        + ["--push_to_hub", "--hub_model_id", repo_id, "--hub_token", hub_server.token, "--hub_private_repo"],
        env,
    )
    assert hub_server.repo(repo_id).private is True  # --hub_private_repo
    files = hub_server.files(repo_id)
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_clipcap.py",
        "configuration_clipcap.py",
        "README.md",
    ):
        assert name in files, sorted(files)
    assert not any(name.startswith("checkpoints/") for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("ClipCapForConditionalGeneration")

    images = sorted(str(p) for p in (setup["data"] / "validation").glob("*.png"))
    code = f"""
        import importlib.abc, json, sys

        class NoPackage(importlib.abc.MetaPathFinder):  # this process cannot import modeling_clipcap
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "modeling_clipcap":
                    raise ImportError("blocked " + name)

        sys.meta_path.insert(0, NoPackage())
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({repo_id!r}, trust_remote_code=True)
        images = [Image.open(p) for p in {images!r}]
        ids = model.generate(**processor(images=images, return_tensors="pt"))
        assert "modeling_clipcap" not in sys.modules
        print(json.dumps({{"module": type(model).__module__,
                          "captions": processor.batch_decode(ids, skip_special_tokens=True)}}))
    """
    proc = hub_server.run_python(code, extra_env={"OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")

    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    ids = model.generate(**processor(images=[Image.open(p) for p in images], return_tensors="pt"))
    assert remote["captions"] == processor.batch_decode(ids, skip_special_tokens=True)
    hub_server.assert_all_handled()
