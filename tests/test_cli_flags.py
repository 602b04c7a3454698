"""Flags of ``clipcap convert`` and ``clipcap evaluate`` that no other test checks change what the command does,
and the one boolean-flag style (``--name``, ``--name true|false``, ``--no_name`` for flags on by default)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_text_config
from test_convert import (
    original_mlp_state_dict,
    original_transformer_state_dict,
    ref_transformer_prefix,
    save,
)
from test_evaluation import fake_spice  # noqa: F401  (fixture: a SPICE scorer that can run, behind a fake java)

from modeling_clipcap import convert_original
from modeling_clipcap.cli import add_bool_argument, main


def test_bool_flags_take_a_value_or_none_and_default_on_flags_have_a_no_form():
    parser = argparse.ArgumentParser()
    add_bool_argument(parser, "push_to_hub")
    add_bool_argument(parser, "verify", default=True)
    add_bool_argument(parser, "freeze", default=None, negative=True)
    assert vars(parser.parse_args([])) == {"push_to_hub": False, "verify": True, "freeze": None}
    assert vars(parser.parse_args(["--push_to_hub", "--no_verify", "--no_freeze"])) == {
        "push_to_hub": True,
        "verify": False,
        "freeze": False,
    }
    assert parser.parse_args(["--verify", "false", "--freeze", "yes"]).verify is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--verify", "maybe"])
    with pytest.raises(SystemExit):  # no --no_ form for a flag that is off by default
        parser.parse_args(["--no_push_to_hub"])


@pytest.fixture()
def original(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path / "gpt2")
    text_config = tiny_text_config(len(tokenizer))
    text_config.save_pretrained(tmp_path / "gpt2")
    checkpoint = save(original_mlp_state_dict(text_config, 24, 10, seed=3), tmp_path / "coco_weights.pt")
    base = ["convert", "--preset", "coco-mlp", "--checkpoint", str(checkpoint), "--image_embed_dim", "24"]
    return base + ["--text_model", str(tmp_path / "gpt2")], tokenizer


def test_convert_flags_reach_the_output(tmp_path, original, monkeypatch):
    argv, tokenizer = original
    verified = []
    real_verify = convert_original.verify_converted_directory
    monkeypatch.setattr(
        convert_original,
        "verify_converted_directory",
        lambda path, model: verified.append(path) or real_verify(path, model),
    )
    default = tmp_path / "default"
    assert main(argv + ["--output_dir", str(default)]) == 0
    flags = ["--normalize_prefix", "--freeze_language_model", "true", "--no_stop_on_eos", "--no_verify"]
    flags += ["--num_beams", "3", "--max_new_tokens", "7"]
    flagged = tmp_path / "flagged"
    assert main(argv + ["--output_dir", str(flagged), *flags]) == 0
    assert verified == [default]  # --no_verify: the second output was not reloaded and compared

    configs = {
        name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("default", "flagged")
    }
    assert (configs["default"]["normalize_prefix"], configs["flagged"]["normalize_prefix"]) == (False, True)
    assert configs["flagged"]["freeze_language_model"] is True
    generation = {n: json.loads((tmp_path / n / "generation_config.json").read_text()) for n in configs}
    assert generation["default"]["eos_token_id"] == [13, tokenizer.eos_token_id]  # "." and <|endoftext|>
    assert generation["flagged"]["eos_token_id"] == 13  # --no_stop_on_eos: only ".", as the original
    assert (generation["flagged"]["num_beams"], generation["flagged"]["max_new_tokens"]) == (3, 7)

    # the earlier --no-NAME spelling still works
    old = tmp_path / "old"
    assert main(argv + ["--output_dir", str(old), "--normalize_prefix", "--no-normalize_prefix"]) == 0
    assert json.loads((old / "config.json").read_text())["normalize_prefix"] is False


def test_convert_transformer_shape_flags(tmp_path):
    """--mapping_type transformer with --num_layers / --num_heads (no preset): a 2-layer, 2-head original
    mapper converts to a model with that shape whose prefix equals the original's computed with 2 heads (the
    default 8 heads would give other numbers from the same weights)."""
    from transformers import AutoModel

    tokenizer = build_tiny_tokenizer(tmp_path / "gpt2")
    text_config = tiny_text_config(len(tokenizer))
    text_config.save_pretrained(tmp_path / "gpt2")
    sd = original_transformer_state_dict(text_config, 24, 4, 3, 2, seed=5)
    out = tmp_path / "out"
    argv = [
        "convert",
        "--checkpoint",
        str(save(sd, tmp_path / "t.pt")),
        "--text_model",
        str(tmp_path / "gpt2"),
    ]
    argv += [
        "--mapping_type",
        "transformer",
        "--prefix_length",
        "4",
        "--clip_length",
        "3",
        "--image_embed_dim",
    ]
    argv += ["24", "--num_layers", "2", "--num_heads", "2", "--output_dir", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["mapping_num_layers"], config["mapping_num_heads"]) == (2, 2)
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    prefix, _ = AutoModel.from_pretrained(out).eval().get_prefix(image_embeds=x)
    assert (prefix - ref_transformer_prefix(sd, x, 3, 2, heads=2)).abs().max() <= 1e-5
    assert (prefix - ref_transformer_prefix(sd, x, 3, 2, heads=8)).abs().max() > 1e-3


def _saved_model_and_images(tmp_path, tiny_model, tiny_processor, n: int = 5):
    """The tiny model saved with its processor, and an image folder of ``n`` random images with references."""
    from PIL import Image

    model_dir = tmp_path / "model"
    tiny_model.generation_config.max_new_tokens = 20
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(images / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "captions": ["a red circle.", "a circle"]}))
    (images / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return model_dir, images


def test_evaluate_limit_beams_tokens_and_meteor_flags(tmp_path, tiny_model, tiny_processor, capsys):
    model_dir, images = _saved_model_and_images(tmp_path, tiny_model, tiny_processor)
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--model",
        str(model_dir),
        "--data",
        str(images / "metadata.jsonl"),
        "--device",
        "cpu",
    ]
    argv += ["--output_dir", str(out), "--spice", "off", "--no_meteor", "--no_progress", "--limit", "3"]
    argv += ["--num_beams", "2", "--max_new_tokens", "2", "--batch_size", "2"]
    assert main(argv) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 3  # --limit 3
    assert all(len(tokenizer_ids) <= 2 for tokenizer_ids in _token_ids(predictions, tiny_processor))
    metrics = json.loads((out / "metrics.json").read_text())
    assert "METEOR" not in metrics and "METEOR" in metrics["skipped"]  # --no_meteor
    assert "SPICE" not in metrics and "not requested" in metrics["skipped"]["SPICE"]  # --spice off
    assert "captioning" not in capsys.readouterr().err  # --no_progress: no progress bar


def test_spice_runs_only_when_asked_for(tmp_path, tiny_model, tiny_processor, fake_spice):  # noqa: F811
    """SPICE is not a default metric anywhere, even on a machine where it could run (here: a fake java that
    scores like SPICE 1.0): the library, the ``coco_caption`` evaluate module and ``clipcap evaluate`` skip it
    with the documented reason unless asked; ``--spice on`` and ``--spice auto`` run the scorer."""
    import evaluate
    from conftest import REPO_ROOT

    from modeling_clipcap.evaluation import (
        SPICE_NOT_REQUESTED,
        compute_caption_metrics,
        spice_unavailable_reason,
    )

    _, java_runs = fake_spice
    assert spice_unavailable_reason() is None  # SPICE can run here: only the default keeps it off
    library = compute_caption_metrics({1: "a red circle"}, {1: ["a red circle."]}, meteor=False)
    module = evaluate.load(str(REPO_ROOT / "metrics" / "coco_caption")).compute(
        predictions=["a red circle"], references=[["a red circle."]], meteor=False
    )
    model_dir, images = _saved_model_and_images(tmp_path, tiny_model, tiny_processor, n=2)
    argv = ["evaluate", "--model", str(model_dir), "--data", str(images), "--no_meteor", "--no_progress"]
    assert main([*argv, "--output_dir", str(tmp_path / "default")]) == 0
    command = json.loads((tmp_path / "default" / "metrics.json").read_text())
    for metrics in (library, module, command):
        assert "SPICE" not in metrics and metrics["skipped"]["SPICE"] == SPICE_NOT_REQUESTED
    assert "CoreNLP" in SPICE_NOT_REQUESTED and "--spice on" in SPICE_NOT_REQUESTED
    assert not java_runs.exists()  # the scorer never started
    for choice in ("on", "auto"):
        assert main([*argv, "--output_dir", str(tmp_path / choice), "--spice", choice]) == 0
        metrics = json.loads((tmp_path / choice / "metrics.json").read_text())
        assert 0 <= metrics["SPICE"] <= 1 and "SPICE" not in metrics["skipped"], choice
    assert len(java_runs.read_text().splitlines()) == 2  # one scorer run per asking command


def test_evaluate_device_flag_puts_the_model_on_that_device(tmp_path, tiny_model, tiny_processor, capsys):
    """--device reaches the model, observed from outside: ``meta`` is a device every torch build has and never
    the default, and no value of a tensor there can be read. With --device meta the model's tensors are on meta,
    so captioning fails saying so; the same command without the flag captions and scores."""
    model_dir, images = _saved_model_and_images(tmp_path, tiny_model, tiny_processor, n=2)
    argv = ["evaluate", "--model", str(model_dir), "--data", str(images), "--spice", "off", "--no_meteor"]
    argv += ["--output_dir", str(tmp_path / "eval"), "--no_progress"]
    capsys.readouterr()
    assert main(argv + ["--device", "meta"]) == 2
    assert "meta tensors" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert main(argv) == 0
    assert "CIDEr" in json.loads((tmp_path / "eval" / "metrics.json").read_text())


def test_evaluate_device_flag_is_used(tmp_path, tiny_model, tiny_processor, capsys):
    """--device reaches the model: a device this machine lacks is refused, naming the flag, before any work."""
    tiny_model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "missing.jsonl")]
    for device, message in (("cuda:99", "no such CUDA device"), ("abacus", "is not a torch device")):
        assert main(argv + ["--device", device]) == 2
        err = capsys.readouterr().err
        assert f"--device {device}" in err.replace("'", "") and message in err
    assert main(argv + ["--device", "cpu"]) == 2  # a usable device: now the missing data file is the error
    assert "missing.jsonl" in capsys.readouterr().err


def test_caption_and_app_device_flags_are_checked_before_loading(
    tmp_path, tiny_model, tiny_processor, capsys
):
    """clipcap caption / the app refuse an unusable --device by name (not torch's AssertionError), and a usable
    one puts the model there."""
    from PIL import Image

    from modeling_clipcap.app import AppInputError, load_app_models

    tiny_model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "a.png")
    argv = ["caption", "--model", str(tmp_path / "model"), str(tmp_path / "a.png"), "--max_new_tokens", "3"]
    for device, message in (("cuda:99", "no such CUDA device"), ("abacus", "is not a torch device")):
        assert main(argv + ["--device", device]) == 2
        err = capsys.readouterr().err
        assert f"--device {device}" in err.replace("'", "") and message in err
        with pytest.raises(AppInputError, match=message):
            load_app_models(tmp_path / "model", device=device)
    assert main(argv + ["--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    # meta is never the default device: finding the model's tensors there shows the flag was applied
    model, _, _, _ = load_app_models(tmp_path / "model", device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert main(argv + ["--device", "meta"]) == 1  # the image fails: its caption cannot be read off meta
    assert "meta tensors" in capsys.readouterr().err


def _token_ids(predictions: list[dict], processor) -> list[list[int]]:
    return [processor.tokenizer(p["caption"], add_special_tokens=False)["input_ids"] for p in predictions]
