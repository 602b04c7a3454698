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
    proc = run_cli(*files, "--model", str(saved_model), "--json", "--num_beams", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == files
    assert all(isinstance(r["caption"], str) and r["error"] is None for r in records)
    assert proc.stderr.strip() == ""  # --quiet: no progress bar


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
