"""PEFT adapters in training/train.py (modeling_clipcap.adapters): what trains, what is saved, merge, bad settings.

Fast tests call ``train.main(argv)`` in this process on tiny models; the ``slow`` ones launch real processes
(SIGKILL + resume, two gloo ranks, FSDP on CPU, pushes to the local Hub emulator).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_processor, subprocess_env, write_tiny_preset
from safetensors.torch import load_file

sys.path.insert(0, str(REPO_ROOT / "training"))

import synthetic_data  # noqa: E402
import train  # noqa: E402

from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration, adapters  # noqa: E402

pytest.importorskip(
    "peft"
)  # the dev extra installs it; a user without the peft extra never reaches these paths

TRAIN_SCRIPT = str(REPO_ROOT / "training" / "train.py")
TRAINING_ARGS = {"learning_rate": 1e-2, "num_warmup_steps": 1, "per_device_train_batch_size": 8}
TRAINING_ARGS |= {"max_caption_length": 24, "num_train_epochs": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic data (12 train + 4 validation images), a tiny preset and a saved base ClipCap model (random)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    synthetic_data.write_to_disk(root / "data", sizes={"train": 12, "validation": 4}, show_progress=False)
    preset = write_tiny_preset(root / "preset", TRAINING_ARGS, max_new_tokens=8)
    config = json.loads((preset / "config.json").read_text())
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # dropout only in the adapters (lora_dropout)
        config["text_config"][key] = 0.0
    torch.manual_seed(0)
    base = ClipCapForConditionalGeneration(ClipCapConfig(**config))
    base.save_pretrained(root / "base")
    processor = build_tiny_processor(AutoTokenizer.from_pretrained(preset))
    processor.save_pretrained(root / "base")
    images = sorted((root / "data" / "validation").glob("*.png"))
    return {"root": root, "preset": preset, "data": root / "data", "base": root / "base", "images": images}


def _argv(setup, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(setup["preset"]), "--train_file", str(setup["data"]), "--output_dir", str(out),
        "--embedding_cache_dir", str(setup["root"] / "cache"), "--model_name_or_path", str(setup["base"]), *extra,
    ]  # fmt: skip


def _pixels(setup) -> torch.Tensor:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(setup["base"])
    return processor(images=[Image.open(p) for p in setup["images"]], return_tensors="pt")["pixel_values"]


def _peft_from_pretrained(base, adapter_dir: Path):
    """``PeftModel.from_pretrained``, the plain peft call a user makes. peft reads the deprecated
    ``is_gradient_checkpointing`` (transformers >= 5.25 warns): peft's call, not ours."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, adapter_dir)


@torch.no_grad()
def _outputs(model, pixels: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens and the logits of the first caption token, (B, V)."""
    model.eval()
    tokens = model.generate(pixel_values=pixels, max_new_tokens=8, do_sample=False, num_beams=1)
    bos = torch.full((pixels.shape[0], 1), model.config.text_config.bos_token_id)
    logits = model(pixel_values=pixels, input_ids=bos).logits[:, -2]
    return tokens.tolist(), logits


# ------------------------------------------------------------------------------------------------ fast


def test_lora_trains_only_adapters_and_mapper_and_every_way_to_load_gives_the_same_tokens(setup, tmp_path):
    """A LoRA run (dropout on the adapters) from a saved base model: the base weights in the final checkpoint
    are bit-identical to the base's, the mapper and adapters moved; the merged model folder (AutoModel),
    the PEFT adapter on the base (``PeftModel.from_pretrained``) and ``clipcap merge`` give the tokens and
    logits of the unmerged model at the end of training."""
    from transformers import AutoModel

    from modeling_clipcap.cli import main as clipcap

    out = tmp_path / "lora"
    extra = ("--lora_r", "4", "--lora_dropout", "0.1", "--lora_target_modules", "c_attn", "c_fc")
    summary = train.main(_argv(setup, out, "--max_train_steps", "6", "--checkpointing_steps", "6", *extra))
    assert summary["adapter"]["peft_type"] == "LORA" and summary["adapter"]["r"] == 4
    assert summary["optimized_modules"] == ["language_model", "mapping_network"]
    assert summary["activation_checkpointing"] is False

    # what trained: compare the unmerged state at the last step with the base
    base = ClipCapForConditionalGeneration.from_pretrained(setup["base"]).state_dict()
    state = load_file(out / "checkpoints" / "step_6" / "model.safetensors")
    lora = [k for k in state if ".lora_" in k]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (c_attn, c_fc) x (A, B)
    assert all(k.startswith("language_model.") for k in lora)
    assert any(state[k].abs().max() > 0 for k in lora if ".lora_B." in k)  # B starts at zero
    for key, value in base.items():
        if key == "language_model.lm_head.weight":  # tied to the input embeddings, stored once
            continue
        if key.startswith("model.mapping_network."):
            rest = key.removeprefix("model.mapping_network.")
            assert torch.equal(state[f"model.mapping_network.original_module.{rest}"], value)
            assert not torch.equal(state[f"model.mapping_network.modules_to_save.default.{rest}"], value), key
        else:  # the tower and every language-model weight: bit-identical
            name = key.rsplit(".", 1)
            stored = state.get(key, state.get(f"{name[0]}.base_layer.{name[1]}"))
            assert stored is not None and torch.equal(stored, value), key

    # the unmerged model at the end of training (base + the same adapters + the checkpoint's weights)
    pixels = _pixels(setup)
    reference = ClipCapForConditionalGeneration.from_pretrained(setup["base"])
    config = adapters.build_adapter_config(
        reference, lora_r=4, lora_dropout=0.1, lora_target_modules=["c_attn", "c_fc"]
    )
    peft_reference = adapters.add_adapters(reference, config)
    reference.load_state_dict(state, strict=False)  # tied lm_head: stored once
    ref_tokens, ref_logits = _outputs(reference, pixels)
    with peft_reference.disable_adapter():  # without its adapters (and trained mapper) the model differs
        assert (_outputs(reference, pixels)[1] - ref_logits).abs().max() > 1e-3

    merged = AutoModel.from_pretrained(out)
    assert type(merged) is ClipCapForConditionalGeneration
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    tokens, logits = _outputs(merged, pixels)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)

    adapter_dir = out / adapters.ADAPTER_DIR
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(setup["base"])
    assert adapter_config["modules_to_save"] == ["mapping_network"]
    on_base = _peft_from_pretrained(
        AutoModel.from_pretrained(adapter_config["base_model_name_or_path"]), adapter_dir
    )
    tokens, logits = _outputs(on_base, pixels)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)

    assert clipcap(["merge", "--base_model", str(setup["base"]), "--adapter", str(adapter_dir),
                    "--output_dir", str(tmp_path / "merged")]) == 0  # fmt: skip
    again = AutoModel.from_pretrained(tmp_path / "merged")
    assert _outputs(again, pixels)[0] == ref_tokens
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert (tmp_path / "merged" / "processor_config.json").is_file()


def test_bad_adapter_settings_name_the_modules_that_exist(setup, tiny_model, capsys, monkeypatch):
    with pytest.raises(
        ValueError, match=r"no linear layer named q_proj; its linear layers are: c_attn, c_fc, c_proj"
    ):
        adapters.build_adapter_config(tiny_model, lora_r=4, lora_target_modules=["q_proj", "c_attn"])
    with pytest.raises(ValueError, match="--lora_r must be >= 1"):
        adapters.build_adapter_config(tiny_model, lora_r=0)
    with pytest.raises(ValueError, match="need --lora_r"):
        adapters.build_adapter_config(tiny_model, lora_alpha=16)
    prompt = setup["root"] / "prompt_tuning.json"
    prompt.write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "target_modules": None})
    )
    with pytest.raises(ValueError, match="prompt-learning method"):
        adapters.build_adapter_config(tiny_model, peft_config=prompt)
    unknown = setup["root"] / "unknown.json"
    unknown.write_text(json.dumps({"peft_type": "NOPE"}))
    with pytest.raises(ValueError, match="unknown peft_type 'NOPE'"):
        adapters.build_adapter_config(tiny_model, peft_config=unknown)
    # the script: one error line, exit status 2
    monkeypatch.setattr(sys, "argv", ["train.py", *_argv(setup, setup["root"] / "bad", "--lora_r", "2",
                                                         "--lora_target_modules", "wte")])  # fmt: skip
    assert train.cli() == 2
    err = capsys.readouterr().err
    assert "train.py: error: --lora_target_modules wte" in err and "c_attn, c_fc, c_proj" in err


def test_a_preset_carries_a_peft_config_and_checkpointing(setup, tmp_path):
    """training_args.json holds ``peft_config`` (here IA3, another peft method, with a path relative to the
    preset) and ``gradient_checkpointing``; the run trains IA3 vectors with activation checkpointing on, and
    its adapter on the base gives the merged model's logits."""
    from transformers import AutoModel

    preset = write_tiny_preset(
        tmp_path / "preset_ia3",
        TRAINING_ARGS | {"peft_config": "./ia3.json", "gradient_checkpointing": True},
    )
    ia3 = {"peft_type": "IA3", "target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"]}
    (preset / "ia3.json").write_text(json.dumps(ia3))
    args = train.parse_args(["--config", str(preset), "--train_file", "x"])
    assert args.peft_config == str(preset / "ia3.json") and args.gradient_checkpointing is True

    out = tmp_path / "ia3"
    argv = _argv(setup, out, "--max_train_steps", "3")
    argv[argv.index("--config") + 1] = str(preset)
    summary = train.main(argv)
    assert summary["adapter"]["peft_type"] == "IA3" and summary["activation_checkpointing"] is True
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2
    pixels = _pixels(setup)
    merged_tokens, merged_logits = _outputs(AutoModel.from_pretrained(out), pixels)
    on_base = _peft_from_pretrained(AutoModel.from_pretrained(setup["base"]), out / adapters.ADAPTER_DIR)
    tokens, logits = _outputs(on_base, pixels)
    assert tokens == merged_tokens
    torch.testing.assert_close(logits, merged_logits, atol=1e-4, rtol=1e-4)
    base_logits = _outputs(AutoModel.from_pretrained(setup["base"]), pixels)[1]
    assert (base_logits - merged_logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ slow


def _run(cmd: list[str], env: dict[str, str], timeout: int = 480) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def _losses(out: Path) -> dict[int, float]:
    records = [
        json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()
    ]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.slow
def test_sigkill_and_resume_with_adapters_gives_the_same_weights(setup, tmp_path):
    """test_kill_resume's driver: SIGKILL from outside after the first checkpoint, resume from ``latest``: the
    merged model, the adapter and every step's loss equal an uninterrupted run's (adapter dropout on)."""
    from test_kill_resume import _launch  # its driver imports train.py and can slow its steps down

    common = ["--lora_r", "4", "--lora_dropout", "0.1", "--per_device_train_batch_size", "3"]
    common += ["--gradient_accumulation_steps", "2", "--max_train_steps", "8", "--checkpointing_steps", "2"]
    env = subprocess_env(tmp_path, TRAINING_DIR=str(REPO_ROOT / "training"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    status, output, _ = _launch(_argv(setup, full, *common), env, timeout=600)
    assert status == 0, output[-4000:]
    resume = ("--resume_from_checkpoint", "latest")
    status, output, at = _launch(
        _argv(setup, killed, *common, *resume), dict(env, STEP_DELAY="0.2"), 3, timeout=600
    )
    assert status == -signal.SIGKILL and at is not None, output[-4000:]
    assert not (killed / "model.safetensors").exists()
    status, output, _ = _launch(_argv(setup, killed, *common, *resume), env, timeout=600)
    assert status == 0 and "Resumed from checkpoint" in output, output[-4000:]
    assert _max_diff(full / "model.safetensors", killed / "model.safetensors") <= 1e-6
    adapter = Path(adapters.ADAPTER_DIR) / "adapter_model.safetensors"
    assert _max_diff(full / adapter, killed / adapter) <= 1e-6
    assert _losses(killed) == pytest.approx(_losses(full), abs=1e-6) and len(_losses(full)) == 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(num_processes: int, distributed: str = "--multi_gpu", *flags: str) -> list[str]:
    """``accelerate launch`` of train.py: one CPU process, or two gloo processes (``distributed``: ``--multi_gpu``,
    or ``--use_fsdp`` which Accelerate takes instead of it)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    cmd += ["--dynamo_backend", "no", *flags]
    if num_processes == 1:
        return cmd + ["--cpu", "--num_processes", "1", TRAIN_SCRIPT]
    return cmd + [distributed, "--num_processes", "2", "--main_process_port", str(_free_port()), TRAIN_SCRIPT]


@pytest.mark.slow
def test_two_gloo_processes_with_adapters_match_one_process(setup, tmp_path):
    common = ["--lora_r", "4", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run(
        _launch_cmd(1) + _argv(setup, one, *common, "--per_device_train_batch_size", "8"),
        subprocess_env(tmp_path),
    )
    env = subprocess_env(tmp_path, ACCELERATE_USE_CPU="true")
    _run(_launch_cmd(2) + _argv(setup, two, *common, "--per_device_train_batch_size", "4"), env)
    assert json.loads((two / "train_results.json").read_text())["num_processes"] == 2
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 4 and max(abs(l1[s] - l2[s]) for s in l1) <= 1e-4, (l1, l2)
    assert _max_diff(one / "model.safetensors", two / "model.safetensors") <= 1e-4
    adapter = Path(adapters.ADAPTER_DIR) / "adapter_model.safetensors"
    assert _max_diff(one / adapter, two / adapter) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_on_cpu_processes_is_refused_not_silently_ddp(setup, tmp_path, lora):
    """Accelerate turns FSDP on for GPU-like devices only: ``--use_fsdp`` with CPU processes would run plain DDP.
    train.py says so and stops (docs/training.md lists what stays untested)."""
    out = tmp_path / "fsdp"
    extra = ["--lora_r", "4"] if lora else []
    cmd = _launch_cmd(2, "--use_fsdp", "--fsdp_version", "2") + _argv(
        setup, out, "--max_train_steps", "2", *extra
    )
    proc = subprocess.run(cmd, env=subprocess_env(tmp_path, ACCELERATE_USE_CPU="true"), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "FSDP was requested (--use_fsdp) but Accelerate runs MULTI_CPU" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "train_log.jsonl").exists()


@pytest.mark.slow
def test_push_adapter_alone_on_a_public_base_or_the_merged_model_on_request(setup, tmp_path, hub_server):
    """The base model public on the (emulated) Hub: ``--push_to_hub`` uploads the adapter folder alone, and the
    base + adapter from the Hub caption as the merged model; ``--push_merged_model`` uploads the merged model,
    which loads with remote code in a process that cannot import the package and never imports peft."""
    base_repo, adapter_repo, merged_repo = (f"{hub_server.user}/{n}" for n in ("base", "lora", "lora-merged"))
    upload = (
        f"from modeling_clipcap.hub import push_folder\npush_folder({str(setup['base'])!r}, {base_repo!r})\n"
    )
    assert hub_server.run_python(upload).returncode == 0
    env = hub_server.env({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    outs = {}
    for repo, extra in ((adapter_repo, []), (merged_repo, ["--push_merged_model"])):
        out = outs[repo] = tmp_path / repo.split("/")[1]
        argv = _argv(
            setup, out, "--max_train_steps", "4", "--lora_r", "4", "--push_to_hub", "--hub_model_id", repo
        )
        argv[argv.index("--model_name_or_path") + 1] = base_repo
        _run([sys.executable, TRAIN_SCRIPT, *argv, *extra], env)
    assert sorted(hub_server.files(adapter_repo)) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
    ]  # fmt: skip
    assert (
        json.loads(hub_server.files(adapter_repo)["adapter_config.json"])["base_model_name_or_path"]
        == base_repo
    )
    assert "model.safetensors" in hub_server.files(merged_repo)

    images = [str(p) for p in setup["images"]]
    code = f"""
        import importlib.abc, json, sys
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        if MODE == "peft":
            import modeling_clipcap
            from peft import PeftModel
            model = PeftModel.from_pretrained(AutoModel.from_pretrained({base_repo!r}), {adapter_repo!r})
            processor = AutoProcessor.from_pretrained({base_repo!r})
        else:
            class NoPackage(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] == "modeling_clipcap":
                        raise ImportError("blocked " + name)
            sys.meta_path.insert(0, NoPackage())
            model = AutoModel.from_pretrained({merged_repo!r}, trust_remote_code=True)
            processor = AutoProcessor.from_pretrained({merged_repo!r}, trust_remote_code=True)
            assert "modeling_clipcap" not in sys.modules and "peft" not in sys.modules
        pixels = processor(images=[Image.open(p) for p in {images!r}], return_tensors="pt")["pixel_values"]
        ids = model.eval().generate(pixel_values=pixels, max_new_tokens=8, do_sample=False, num_beams=1)
        print(json.dumps(ids.tolist()))
    """
    from transformers import AutoModel

    for mode, repo in (("peft", adapter_repo), ("remote", merged_repo)):
        proc = hub_server.run_python(
            f"MODE = {mode!r}\n" + textwrap.dedent(code), {"OMP_NUM_THREADS": "1"}, tmp_path
        )
        local = _outputs(AutoModel.from_pretrained(outs[repo]), _pixels(setup))[0]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == local, mode
    hub_server.assert_all_handled()
