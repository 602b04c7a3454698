"""The one flag style of every command and training script, and flags that no other test checks.

* The convention, checked on every parser (``clipcap`` commands, training/*.py): booleans in HfArgumentParser's
  style from ``cli.add_bool_argument`` (``--name``, ``--name true|false``, and a ``--no_name`` twin for every
  one), no switch spelled ``--no_...`` of its own, a flag that sets a ``ClipCapConfig`` field named as the field,
  and every hidden flag an earlier spelling that prints its new one.
* Earlier spellings (``--quiet``, ``--num_layers``, ``--no_meteor``...) still work and name the new spelling.
* Flags of ``clipcap caption | convert | evaluate | embed | env | app`` and of the training scripts change what
  the command does (a flag that were ignored would fail its test).
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_tokenizer, tiny_text_config
from test_convert import (
    original_mlp_state_dict,
    original_transformer_state_dict,
    ref_transformer_prefix,
    save,
)
from test_evaluation import fake_spice  # noqa: F401  (fixture: a SPICE scorer that can run, behind a fake java)

from modeling_clipcap import convert_original
from modeling_clipcap.cli import (
    COMMANDS,
    RenamedFlag,
    add_bool_argument,
    add_renamed_argument,
    build_parser,
    main,
)
from modeling_clipcap.configuration_clipcap import ClipCapConfig

sys.path.insert(0, str(REPO_ROOT / "training"))

import demo  # noqa: E402
import pretrain_clip  # noqa: E402
import pretrain_lm  # noqa: E402
import synthetic_data  # noqa: E402
import train  # noqa: E402

# ---------------------------------------------------------------------------------------------- the convention


def test_bool_flags_take_a_value_or_none_and_every_one_has_a_no_form():
    parser = argparse.ArgumentParser()
    add_bool_argument(parser, "push_to_hub")
    add_bool_argument(parser, "verify", default=True)
    add_bool_argument(parser, "freeze", default=None, help="train less (default: the preset's)")
    add_bool_argument(parser, "json", takes_value=False)
    assert vars(parser.parse_args([])) == {
        "push_to_hub": False,
        "verify": True,
        "freeze": None,
        "json": False,
    }
    assert vars(parser.parse_args(["--push_to_hub", "--no_verify", "--no_freeze", "--json"])) == {
        "push_to_hub": True,
        "verify": False,
        "freeze": False,
        "json": True,
    }
    assert parser.parse_args(["--verify", "false", "--freeze", "yes"]).verify is False
    assert parser.parse_args(["--push_to_hub", "--no_push_to_hub"]).push_to_hub is False  # the last one wins
    assert parser.parse_args(["--json", "--no_json"]).json is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--verify", "maybe"])
    with pytest.raises(SystemExit):  # a switch takes no value (it would swallow a path after it)
        parser.parse_args(["--json", "true"])
    helps = {a.option_strings[0]: a.help for a in parser._actions}
    assert "(default: false)" in helps["--push_to_hub"] and "(default: true)" in helps["--verify"]


def test_a_renamed_flag_sets_what_the_new_one_sets_and_names_it(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    add_bool_argument(parser, "progress", default=True)
    parser.add_argument("--mapping_num_layers", type=int)
    add_renamed_argument(parser, "--quiet", "--no_progress")
    add_renamed_argument(parser, "--num_layers", "--mapping_num_layers")
    assert "--quiet" not in parser.format_help() and "--num_layers" not in parser.format_help()
    args = parser.parse_args(["--quiet", "--num_layers", "3"])
    assert (args.progress, args.mapping_num_layers) == (False, 3)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "tool: --quiet is now spelled --no_progress; the old spelling still works for now and will be removed.",
        "tool: --num_layers is now spelled --mapping_num_layers; the old spelling still works for now and will "
        "be removed.",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--num_layers", "three"])  # the new flag's type


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's and training script's parser, by how a user starts it."""
    top = build_parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(COMMANDS)  # every command could be built here
    parsers = {f"clipcap {name}": parser for name, parser in commands.items()}
    parsers["training/train.py"] = train.build_parser()
    parsers["training/pretrain_clip.py"] = pretrain_clip.build_parser()
    parsers["training/pretrain_lm.py"] = pretrain_lm.build_parser()
    parsers["training/synthetic_data.py"] = synthetic_data.build_arg_parser()
    parsers["training/demo.py"] = demo.build_parser()
    return parsers


def _is_boolean(action: argparse.Action) -> bool:
    from transformers.hf_argparser import string_to_bool

    switch = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)
    return action.type is string_to_bool or isinstance(action, switch) or isinstance(action.const, bool)


CONFIG_FIELDS = set(ClipCapConfig.__annotations__)
# the ClipCapConfig fields each command or script sets from its flags
SETS_CONFIG_FIELDS = {
    "clipcap convert": {
        "mapping_type", "prefix_length", "clip_length", "mapping_num_layers", "mapping_num_heads",
        "image_embed_dim", "normalize_prefix", "freeze_language_model",
    },
    "training/train.py": set(train.MODEL_FIELDS),
}  # fmt: skip


def test_every_command_and_script_follows_the_flag_convention():
    """A flag added in another style fails here: a switch of its own named --no_..., a boolean without its --no_
    twin or without its default in the help, a hidden flag that is not a renamed spelling, a Namespace name other
    than the flag's, or a flag that sets a config field under another name (--num_layers for
    mapping_num_layers)."""
    problems = []
    for where, parser in _parsers().items():
        options = {o: a for a in parser._actions for o in a.option_strings}
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            name = flag[2:]
            if len(action.option_strings) != 1 or not flag.startswith("--"):
                problems.append(f"{where} {action.option_strings}: one --long_name per flag")
            if isinstance(action, RenamedFlag):
                if action.help != argparse.SUPPRESS or options.get(action.new_flag) is None:
                    problems.append(f"{where} {flag}: a renamed flag is hidden and its new spelling exists")
                elif options[action.new_flag].dest != action.dest:
                    problems.append(f"{where} {flag}: sets {action.dest}, {action.new_flag} sets another")
                continue
            if action.help == argparse.SUPPRESS:
                problems.append(
                    f"{where} {flag}: a hidden flag that is not a renamed spelling (add_renamed_argument)"
                )
            if "-" in name:
                problems.append(f"{where} {flag}: words joined by _ as in the config fields")
            if name.startswith("no_"):
                twin = options.get(f"--{name[3:]}")
                if (
                    not isinstance(action, argparse._StoreFalseAction)
                    or twin is None
                    or twin.dest != action.dest
                ):
                    problems.append(f"{where} {flag}: a --no_ flag is only the twin of --{name[3:]}")
                continue
            if action.dest != name:
                problems.append(f"{where} {flag}: read as args.{action.dest}, not args.{name}")
            if _is_boolean(action):
                twin = options.get(f"--no_{name}")
                if isinstance(action, argparse._StoreFalseAction) or action.const is not True:
                    problems.append(
                        f"{where} {flag}: a boolean flag turns its setting on (add_bool_argument)"
                    )
                if not isinstance(twin, argparse._StoreFalseAction) or twin.dest != name:
                    problems.append(f"{where} {flag}: no --no_{name} twin (add_bool_argument)")
                if "default" not in (action.help or "").lower():
                    problems.append(f"{where} {flag}: the help states the default")
            longer = [f for f in CONFIG_FIELDS if f.endswith(f"_{name}")] if "_" in name else []
            if name not in CONFIG_FIELDS and longer:
                problems.append(f"{where} {flag}: sets the config field {longer[0]}? name it --{longer[0]}")
        for field in SETS_CONFIG_FIELDS.get(where, ()):
            if field not in CONFIG_FIELDS or f"--{field}" not in options:
                problems.append(f"{where}: the config field {field} is set by --{field}")
    assert not problems, "\n".join(problems)


def _minimal_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Values for the required arguments of ``parser`` (enough to parse, nothing is run)."""
    argv = []
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            argv.append("x")  # a positional
        elif action.required:
            argv += [action.option_strings[0], "1"]
    return argv


RENAMED = {  # earlier spellings users may have in their scripts, and what they are now
    ("clipcap caption", "--quiet"): "--no_progress",
    ("clipcap convert", "--num_layers"): "--mapping_num_layers",
    ("clipcap convert", "--num_heads"): "--mapping_num_heads",
    ("clipcap convert", "--no-normalize_prefix"): "--no_normalize_prefix",
    ("clipcap convert", "--no-freeze_language_model"): "--no_freeze_language_model",
    ("training/demo.py", "--no_meteor"): "--no_eval_meteor",
}


def test_every_earlier_spelling_still_works_and_prints_the_new_one(capsys):
    found = {}
    for where, parser in _parsers().items():
        for action in parser._actions:
            if isinstance(action, RenamedFlag):
                found[(where, action.option_strings[0])] = action.new_flag
                value = [] if action.nargs == 0 else ["2"]
                base = _minimal_argv(parser)
                capsys.readouterr()
                old = parser.parse_args(base + [action.option_strings[0], *value])
                err = capsys.readouterr().err.splitlines()
                new = parser.parse_args(base + [action.new_flag, *value])
                assert vars(old) == vars(new) != vars(parser.parse_args(base)), (where, action.option_strings)
                assert (
                    len(err) == 1 and f"{action.option_strings[0]} is now spelled {action.new_flag}" in err[0]
                )
                assert not capsys.readouterr().err  # the new spelling says nothing
    assert found == RENAMED


def test_app_share_yes_and_no_are_still_understood():
    """``--share yes`` / ``--share no`` (the only spelling before) are HfArgumentParser's own values of --share."""
    parser = _parsers()["clipcap app"]
    assert parser.parse_args(["--model", "m", "--share", "yes"]).share is True
    assert parser.parse_args(["--model", "m", "--share", "no"]).share is False


# ---------------------------------------------------------------------------------------------- clipcap convert


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

    # --no_NAME turns a flag given before off
    off = tmp_path / "off"
    assert main(argv + ["--output_dir", str(off), "--normalize_prefix", "--no_normalize_prefix"]) == 0
    assert json.loads((off / "config.json").read_text())["normalize_prefix"] is False


def test_convert_transformer_shape_flags(tmp_path):
    """--mapping_type transformer with --mapping_num_layers / --mapping_num_heads (no preset): a 2-layer, 2-head original
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
    argv += ["24", "--mapping_num_layers", "2", "--mapping_num_heads", "2", "--output_dir", str(out)]
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

    from modeling_clipcap.caption_metrics import (
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


# ---------------------------------------------------------------------------------------------- progress bars


def test_caption_progress_and_json_flags(tmp_path, tiny_model, tiny_processor, capsys):
    """clipcap caption shows its progress bar unless --no_progress (or the earlier --quiet, which also says so);
    --json writes JSON lines, --no_json turns a --json given before off."""
    model_dir, images = _saved_model_and_images(tmp_path, tiny_model, tiny_processor, n=2)
    argv = ["caption", str(images / "0.png"), "--model", str(model_dir), "--max_new_tokens", "3"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "captioning" in capsys.readouterr().err  # the bar, by default
    assert main(argv + ["--no_progress"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\t") == 1  # no bar; PATH<TAB>CAPTION
    assert main(argv + ["--quiet", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "clipcap caption: --quiet is now spelled --no_progress; the old spelling still works for now and will be "
        "removed."
    ]
    assert json.loads(out)["image"] == str(images / "0.png")
    assert main(argv + ["--no_progress", "--json", "--no_json"]) == 0
    assert "\t" in capsys.readouterr().out


def test_embed_progress_flag_reaches_the_encoder(tmp_path, monkeypatch):
    """clipcap embed --no_progress: the encoding loop is asked for no progress bar (on by default)."""
    from modeling_clipcap import embed

    asked = []

    def fake_embed_shards(encoder, image_processor, data, output_dir, **kwargs):
        asked.append(kwargs["show_progress"])
        return {"shards_written": 0, "shards_skipped": 0, "images_encoded": 0, "skipped": []}

    monkeypatch.setattr(
        embed, "load_image_encoder", lambda model: (torch.nn.Identity(), None, {"model": model})
    )
    monkeypatch.setattr(embed, "embed_shards", fake_embed_shards)
    argv = ["embed", "--model", "m", "--data", str(tmp_path / "*.tar"), "--output_dir", str(tmp_path / "out")]
    assert (
        main(argv) == 0 and main(argv + ["--no_progress"]) == 0 and main(argv + ["--progress", "false"]) == 0
    )
    assert asked == [True, False, False]


def test_training_scripts_progress_flags(tmp_path, monkeypatch, capsys):
    """synthetic_data.py and pretrain_clip.py show progress bars unless --no_progress (or --progress false)."""
    argv = ["--output_dir", str(tmp_path / "data"), "--train_size", "2", "--validation_size", "1"]
    argv += ["--test_size", "1", "--test_novel_size", "1"]
    capsys.readouterr()
    assert synthetic_data.main(argv) == 0
    assert "writing train" in capsys.readouterr().err
    for off in (["--no_progress"], ["--progress", "false"]):
        assert synthetic_data.main(argv + off) == 0
        assert "writing" not in capsys.readouterr().err

    asked = []
    monkeypatch.setattr(
        pretrain_clip, "pretrain_tower", lambda *args, **kwargs: asked.append(kwargs["show_progress"]) or {}
    )
    argv = ["--train_file", str(tmp_path / "data" / "train"), "--output_dir", str(tmp_path / "clip")]
    argv += ["--tokenizer_name", "t", "--config", "clipcap-synthetic-tiny"]
    for extra in ([], ["--no_progress"], ["--progress", "false"]):
        assert pretrain_clip.main(argv + extra) == 0
    assert asked == [True, False, False]


# ---------------------------------------------------------------------------------------------- app, env, demo


def test_app_share_flag_reaches_launch(monkeypatch):
    from modeling_clipcap import app

    shared = []
    monkeypatch.setattr(app, "build_app", lambda model, **kwargs: object())
    monkeypatch.setattr(app, "launch_app", lambda demo, **kwargs: shared.append(kwargs["share"]))
    for flags in ([], ["--share"], ["--share", "yes"], ["--share", "false"], ["--share", "--no_share"]):
        assert main(["app", "--model", "m", *flags]) == 0
    assert shared == [False, True, True, False, False]


def test_env_json_flag(capsys):
    assert main(["env", "--json"]) == 0
    assert "python" in json.loads(capsys.readouterr().out)
    assert main(["env", "--json", "--no_json"]) == 0
    assert capsys.readouterr().out.startswith("Copy and paste")


class _Stop(Exception):
    """Ends the demo at the stage a test looks at."""


def _demo_command(tmp_path, monkeypatch, flags: list[str], stage: str) -> list[str]:
    """The command of ``stage`` ("synthetic_data.py" or "evaluate") demo.main builds with ``flags``: the data set is
    written for real, the tower pretraining and training commands are recorded, not run."""
    commands = []

    def fake_run(cmd, env=None):
        commands.append(cmd)
        if stage in cmd or cmd[1].endswith(stage):
            raise _Stop
        if cmd[1].endswith("synthetic_data.py"):
            assert synthetic_data.main([*cmd[2:], "--no_progress"]) == 0

    monkeypatch.setattr(demo, "run", fake_run)
    with pytest.raises(_Stop):
        demo.main(["--output_dir", str(tmp_path / "demo"), "--recipe", "random", *flags])
    return commands[-1]


def test_demo_eval_meteor_and_quick_flags(tmp_path, monkeypatch, capsys):
    """demo.py --no_eval_meteor (or --eval_meteor false, or the earlier --no_meteor) evaluates without METEOR;
    --quick shrinks the data set (--no_quick: the demo.json sizes)."""
    assert _demo_command(tmp_path, monkeypatch, ["--quick"], "synthetic_data.py")[-8:] == [
        "--train_size", "600", "--validation_size", "20", "--test_size", "60", "--test_novel_size", "30"
    ]  # fmt: skip
    assert "20000" in _demo_command(tmp_path, monkeypatch, ["--quick", "--no_quick"], "synthetic_data.py")
    sizes = ["--train_size", "6", "--validation_size", "1", "--test_size", "1", "--test_novel_size", "1"]
    evaluate = _demo_command(tmp_path, monkeypatch, sizes, "evaluate")
    assert evaluate[:4] == [sys.executable, "-m", "modeling_clipcap.cli", "evaluate"]
    assert "--no_meteor" not in evaluate  # METEOR by default
    for off in (["--no_eval_meteor"], ["--eval_meteor", "false"], ["--no_meteor"]):
        capsys.readouterr()
        assert "--no_meteor" in _demo_command(tmp_path, monkeypatch, sizes + off, "evaluate"), off
        assert ("is now spelled --no_eval_meteor" in capsys.readouterr().err) == (off == ["--no_meteor"])
