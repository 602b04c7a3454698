"""``clipcap caption`` and ``caption_images``: batched captioning of files and folders, per-file errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_clipcap.captioning import caption_images, expand_inputs, load_captioner

REPO_ROOT = Path(__file__).resolve().parents[1]
GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture()
def saved_model(tmp_path, tiny_model, tiny_processor) -> Path:
    out = tmp_path / "model"
    tiny_model.generation_config.max_new_tokens = 6
    tiny_model.save_pretrained(out)
    tiny_processor.save_pretrained(out)
    return out


def _image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture()
def mixed_folder(tmp_path) -> tuple[Path, list[str], list[str]]:
    """A folder with 4 good images (PNG, JPEG, grayscale PNG, RGBA PNG) and 3 bad files."""
    folder = tmp_path / "images"
    folder.mkdir()
    _image(1).save(folder / "a_good.png")
    _image(2).save(folder / "b_good.jpg", quality=90)
    _image(3).convert("L").save(folder / "c_gray.png")
    _image(4, (20, 50)).convert("RGBA").save(folder / "d_rgba.png")
    (folder / "e_empty.png").write_bytes(b"")
    (folder / "f_text.jpg").write_text("this is not an image\n")
    buf = io.BytesIO()
    _image(5, (64, 64)).save(buf, format="JPEG", quality=95)
    (folder / "g_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.txt").write_text("ignored: not an image extension\n")
    good = ["a_good.png", "b_good.jpg", "c_gray.png", "d_rgba.png"]
    bad = ["e_empty.png", "f_text.jpg", "g_truncated.jpg"]
    return folder, good, bad


def test_caption_images_matches_direct_generate_and_reports_bad_files(saved_model, mixed_folder):
    folder, good, bad = mixed_folder
    model, processor = load_captioner(saved_model)
    results = list(caption_images(model, processor, expand_inputs([folder]), batch_size=3, **GEN))
    names = [Path(p).name for p, _, _ in results]
    assert names == sorted(good + bad)  # folder order, every file once
    by_name = {Path(p).name: (c, e) for p, c, e in results}
    for name in bad:
        caption, error = by_name[name]
        assert caption is None and name in error
    # each caption equals generating for that image alone
    for name in good:
        caption, error = by_name[name]
        assert error is None and isinstance(caption, str)
        image = Image.open(folder / name).convert("RGB")
        if image.mode != "RGB":  # pragma: no cover
            image = image.convert("RGB")
        from modeling_clipcap.image_io import load_image

        pixel_values = processor(images=[load_image(folder / name)], return_tensors="pt")["pixel_values"]
        ids = model.generate(pixel_values=pixel_values, **GEN)
        assert caption == " ".join(processor.batch_decode(ids)[0].split())


def test_caption_images_is_lazy(saved_model):
    """Paths are consumed one batch at a time (memory stays flat over long inputs)."""
    model, processor = load_captioner(saved_model)
    consumed: list[int] = []

    def paths():
        for i in range(10):
            consumed.append(i)
            yield f"/nonexistent/{i}.png"

    iterator = caption_images(model, processor, paths(), batch_size=4, **GEN)
    first = next(iterator)
    assert first[1] is None and "/nonexistent/0.png" in first[2]
    assert len(consumed) == 4
    assert len(list(iterator)) == 9


def test_caption_images_rejects_bad_batch_size(saved_model):
    model, processor = load_captioner(saved_model)
    with pytest.raises(ValueError, match="batch_size"):
        next(caption_images(model, processor, ["x.png"], batch_size=0))


def _run_cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modeling_clipcap.cli", "caption", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )


@pytest.fixture()
def run_cli(capsys):
    """Run ``clipcap caption ARGS`` in this process; returns (exit status, stdout, stderr)."""
    from modeling_clipcap.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()  # drop what fixtures printed
        try:
            code = main(["caption", *args])
        except SystemExit as exc:  # argparse errors
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def test_cli_folder_with_bad_files_subprocess(saved_model, mixed_folder):
    """The real console entry point: good images captioned, bad ones named, exit 1, no traceback."""
    folder, good, bad = mixed_folder
    proc = _run_cli_subprocess(
        str(folder), "--model", str(saved_model), "--batch_size", "2", "--max_new_tokens", "5"
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [Path(line.split("\t")[0]).name for line in lines] == good
    assert all(len(line.split("\t")) == 2 for line in lines)
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(bad)
    for name in bad:
        assert any(line.startswith(f"error: {folder / name}: ") for line in error_lines), proc.stderr
    assert "captioning" in proc.stderr  # the progress bar


def test_cli_json_and_files_in_given_order(run_cli, saved_model, mixed_folder):
    folder, good, _ = mixed_folder
    files = [str(folder / good[2]), str(folder / good[0])]
    proc = run_cli(*files, "--model", str(saved_model), "--json", "--num_beams", "2", "--no_progress")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == files
    assert all(isinstance(r["caption"], str) and r["error"] is None for r in records)
    assert proc.stderr.strip() == ""  # --no_progress: no progress bar


def test_cli_json_lists_failures(run_cli, saved_model, mixed_folder):
    folder, _, _ = mixed_folder
    proc = run_cli(
        str(folder / "a_good.png"), str(folder / "missing.png"), "--model", str(saved_model), "--json"
    )
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records[0]["caption"] is not None
    assert records[1]["caption"] is None and "no such file" in records[1]["error"]
    assert f"error: {folder / 'missing.png'}: no such file or folder" in proc.stderr


def test_cli_bfloat16(run_cli, saved_model, mixed_folder, monkeypatch):
    from modeling_clipcap import ClipCapForConditionalGeneration

    seen = []  # (parameter dtypes, pixel_values dtype) of every generate call the command makes
    generate = ClipCapForConditionalGeneration.generate

    def recording_generate(self, *args, **kwargs):
        seen.append(({p.dtype for p in self.parameters()}, kwargs["pixel_values"].dtype))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(ClipCapForConditionalGeneration, "generate", recording_generate)
    folder, good, _ = mixed_folder
    proc = run_cli(str(folder / good[0]), "--model", str(saved_model), "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    assert seen == [({torch.bfloat16}, torch.bfloat16)]  # the whole model and its input in bf16


@pytest.mark.parametrize(
    "model_arg, extra, message",
    [
        ("MISSING", [], "does not exist"),
        ("EMPTY", [], "no config.json"),
        ("OK", ["--batch_size", "0"], "--batch_size must be a positive integer"),
        ("OK", ["--num_beams", "-1"], "--num_beams must be a positive integer"),
    ],
)
def test_cli_usage_errors_exit_2(run_cli, saved_model, mixed_folder, tmp_path, model_arg, extra, message):
    folder, _, _ = mixed_folder
    (tmp_path / "empty_dir").mkdir()
    model = {"MISSING": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty_dir"), "OK": str(saved_model)}[
        model_arg
    ]
    proc = run_cli(str(folder), "--model", model, *extra)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_corrupt_model_weights_exit_2(run_cli, saved_model, mixed_folder):
    folder, _, _ = mixed_folder
    (saved_model / "model.safetensors").write_bytes(b"garbage")
    proc = run_cli(str(folder), "--model", str(saved_model))
    assert proc.returncode == 2
    assert "cannot load the model" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_empty_folder_is_an_error(run_cli, saved_model, tmp_path):
    empty = tmp_path / "no_images"
    empty.mkdir()
    proc = run_cli(str(empty), "--model", str(saved_model))
    assert proc.returncode == 1
    assert f"error: {empty}: the folder contains no image files" in proc.stderr


def test_cli_argparse_errors_exit_2(run_cli, saved_model, mixed_folder):
    folder, _, _ = mixed_folder
    proc = run_cli(str(folder), "--model", str(saved_model), "--dtype", "float16")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run_cli(str(folder))  # no --model
    assert proc.returncode == 2 and "--model" in proc.stderr


def test_bfloat16_vision_loads_only_the_clip_tower_in_bf16(saved_model, run_cli, mixed_folder):
    from modeling_clipcap.captioning import load_captioner

    model, _ = load_captioner(saved_model, dtype="bfloat16-vision")
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.language_model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.mapping_network.parameters()} == {torch.float32}
    folder, good, _ = mixed_folder
    proc = run_cli(str(folder / good[0]), "--model", str(saved_model), "--dtype", "bfloat16-vision")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1


# ----------------------------------------------------------------------------- the one captioning path


def test_caption_items_takes_paths_images_rows_and_embeddings_in_order(saved_model, mixed_folder):
    """Every kind of item in one stream: ids, order, num_return_sequences captions each, equal to generating for
    the image alone; a bad file reported in its place ("skip") or raised ("fail" and its other name "error")."""
    from modeling_clipcap.captioning import caption_items
    from modeling_clipcap.image_io import ImageLoadError, load_image

    folder, good, bad = mixed_folder
    model, processor = load_captioner(saved_model)
    photo = load_image(folder / good[1])
    with torch.no_grad():
        pixels = processor(images=[photo], return_tensors="pt")["pixel_values"]
        embeds = model.get_image_embeddings(pixel_values=pixels).pooler_output[
            0
        ]  # (D,): what image_embeds takes
    items = [
        str(folder / good[0]),  # a path: its id is the path
        photo,  # a PIL image: its id is its position
        {"image_id": "row", "image": str(folder / good[2])},
        {"image_id": "embedded", "image_embeds": embeds},
        str(folder / bad[0]),
        {"image_id": "known", "error": "listed as broken"},
    ]
    kwargs = dict(num_beams=2, num_return_sequences=2, max_new_tokens=5)
    generate_calls: list[list] = []
    results = list(
        caption_items(
            model,
            processor,
            items,
            batch_size=4,
            on_bad_image="skip",
            on_batch=lambda ids, inputs, images: generate_calls.append(ids),
            **kwargs,
        )
    )
    assert [r[0] for r in results] == [
        str(folder / good[0]),
        1,
        "row",
        "embedded",
        str(folder / bad[0]),
        "known",
    ]
    assert generate_calls == [[str(folder / good[0]), 1, "row"], ["embedded"]]  # one call per kind and batch
    for (_, captions, error), image in zip(results, [good[0], good[1], good[2], good[1]]):
        inputs = processor(images=[load_image(folder / image)], return_tensors="pt")
        with torch.no_grad():
            expected = processor.batch_decode(model.generate(**inputs, **kwargs))
        assert error is None and captions == [" ".join(t.split()) for t in expected]
    assert results[4][1] == [] and bad[0] in results[4][2]
    assert results[5] == ("known", [], "listed as broken")
    for policy in ("fail", "error"):
        with pytest.raises(ImageLoadError, match=bad[0]):
            list(caption_items(model, processor, items[4:5], on_bad_image=policy))
    with pytest.raises(ValueError, match="on_bad_image"):
        next(caption_items(model, processor, items, on_bad_image="ignore"))


def test_pipeline_batch_size_reaches_generate(saved_model, mixed_folder, monkeypatch):
    """The pipeline captions through caption_items: batch_size images per generate call, one result per image."""
    from transformers import pipeline

    from modeling_clipcap import ClipCapForConditionalGeneration

    folder, good, _ = mixed_folder
    sizes: list[int] = []
    generate = ClipCapForConditionalGeneration.generate

    def recording_generate(self, *args, **kwargs):
        sizes.append(int(kwargs["pixel_values"].shape[0]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(ClipCapForConditionalGeneration, "generate", recording_generate)
    captioner = pipeline("image-captioning", model=str(saved_model))
    paths = [str(folder / name) for name in good]
    batched = captioner(paths, batch_size=3, max_new_tokens=4)
    assert sizes == [3, 1]
    single = captioner(paths, max_new_tokens=4)
    assert sizes[2:] == [1, 1, 1, 1] and single == batched
    assert captioner(paths[0], max_new_tokens=4) == batched[0] and len(batched[0]) == 1


# ----------------------------------------------------------------------------- the one model loader


def test_load_captioner_names_an_input_that_is_neither_a_folder_nor_a_hub_id(tmp_path, monkeypatch):
    from modeling_clipcap.captioning import CaptionInputError

    with pytest.raises(
        CaptionInputError, match=r"--model .*nope: no such folder.*not a Hugging Face Hub model id"
    ):
        load_captioner(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CaptionInputError, match=r"--model someone/no-such-model is not a local folder, and down"
    ):
        load_captioner("someone/no-such-model")


def test_caption_evaluate_and_app_load_a_hub_model_id(hub_server, saved_model, mixed_folder, tmp_path):
    """clipcap caption, clipcap evaluate and the app take a Hub model id (the real huggingface_hub client against
    the local Hub emulation): the same captions as the local folder gives; an unknown id is named."""
    folder, good, _ = mixed_folder
    data = tmp_path / "data"
    data.mkdir()
    for name in good[:2]:
        (data / name).write_bytes((folder / name).read_bytes())
    rows = [json.dumps({"file_name": name, "captions": ["a red circle."]}) for name in good[:2]]
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    model, processor = load_captioner(saved_model)
    local = {Path(p).name: c for p, c, _ in caption_images(model, processor, [data / n for n in good[:2]])}
    repo = f"{hub_server.user}/tiny-clipcap"
    out = tmp_path / "out.json"
    hub_server.run_python(
        f"""
        import contextlib, io, json
        from pathlib import Path
        from huggingface_hub import HfApi
        from modeling_clipcap.app import load_app_models
        from modeling_clipcap.cli import main

        HfApi().create_repo({repo!r})
        HfApi().upload_folder(folder_path={str(saved_model)!r}, repo_id={repo!r})
        caption_out, caption_err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(caption_out):
            status = main(["caption", {str(data / good[0])!r}, {str(data / good[1])!r}, "--model", {repo!r},
                           "--json", "--no_progress"])
        assert status == 0, status
        with contextlib.redirect_stderr(caption_err):
            missing = main(["caption", {str(data / good[0])!r}, "--model", "{hub_server.user}/no-such-model"])
        status = main(["evaluate", "--model", {repo!r}, "--data", {str(data)!r}, "--split", "train",
                       "--no_meteor", "--no_progress", "--output_dir", {str(tmp_path / "eval")!r}])
        assert status == 0, status
        _, _, _, model_dir = load_app_models({repo!r})
        Path({str(out)!r}).write_text(json.dumps({{
            "caption": [json.loads(line) for line in caption_out.getvalue().splitlines()],
            "missing": [missing, caption_err.getvalue()],
            "evaluate": json.loads(Path({str(tmp_path / "eval" / "predictions.json")!r}).read_text()),
            "app_dir_has_config": (model_dir / "config.json").is_file(),
        }}))
        """
    )
    hub_server.assert_all_handled()
    got = json.loads(out.read_text())
    assert {Path(r["image"]).name: r["caption"] for r in got["caption"]} == local
    assert {p["image_id"]: p["caption"] for p in got["evaluate"]} == local
    status, stderr = got["missing"]
    assert status == 2 and f"{hub_server.user}/no-such-model is not a local folder, and downloading" in stderr
    assert got["app_dir_has_config"]
