"""Reliability under bad input and long runs; safety with untrusted files (issue 6).

Every row of docs/reliability.md names a test; the ones not in another test file live here:

* one folder mixing good images with every kind of bad file (zero bytes, truncated JPEG, a text
  file named .jpg, a decompression bomb, a directory named .jpg) through every entry point:
  ``clipcap caption`` (a real subprocess), ``clipcap evaluate``, the data readers, the embedding
  cache and ``training/train.py``, with ``on_bad_image`` fail and skip;
* odd but valid images (grayscale, RGBA, palette, CMYK, 16-bit, EXIF-rotated, 1x1) converted
  correctly by ``image_io.load_image`` and the processor (the processor alone: all but 16-bit), end to end
  through ``generate``;
* property-based tests of the processor: random bytes and random valid images never raise
  anything but its ``ValueError`` naming the image;
* tensor inputs the model refuses before any heavy work;
* checkpoints from strangers: pickles that would run code are never run (``from_pretrained`` of a
  ``pytorch_model.bin``, Accelerate checkpoint files);
* a long captioning run: 2,000 images in one process with flat memory and steady throughput.
"""

from __future__ import annotations

import gc
import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    build_tiny_processor,
    build_tiny_tokenizer,
    write_tiny_preset,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_clipcap import ClipCapForConditionalGeneration
from modeling_clipcap.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

GEN = {"max_new_tokens": 5, "do_sample": False, "num_beams": 1}


# ------------------------------------------------------------------------------------------------ helpers


def _noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims ``width x height`` RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# bad file name -> a word its error message must contain
BAD_FILES = {
    "g_empty.jpg": "empty (0 bytes)",
    "h_truncated.jpg": "truncated",
    "i_text.jpg": "not an image",
    "j_bomb.png": "decompression",
    "k_folder.jpg": "directory",
}
# bad files that a data reader finds without decoding (stat only)
STAT_BAD = {"g_empty.jpg", "k_folder.jpg"}


def make_mixed_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Write 6 good images of different kinds and the 5 bad files of :data:`BAD_FILES`.

    Returns ``(good, bad)`` file names, each sorted.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _noise((40, 30), 1).save(folder / "a_rgb.png")
    _noise((48, 36), 2).save(folder / "b_photo.jpg", quality=90)
    _noise((30, 30), 3, "L").save(folder / "c_gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise((50, 20), 4).save(folder / "d_exif.jpg", exif=exif, quality=90)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "e_1x1.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(folder / "f_cmyk.jpg")
    (folder / "g_empty.jpg").write_bytes(b"")
    jpeg = _encode(_noise((64, 64), 5), "JPEG", quality=95)
    (folder / "h_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "i_text.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    side = int(DEFAULT_MAX_PIXELS**0.5) + 100  # just over the default pixel limit; 60 bytes on disk
    (folder / "j_bomb.png").write_bytes(_png_header_only(side, side))
    (folder / "k_folder.jpg").mkdir()
    (folder / "notes.txt").write_text("not an image extension: never read\n")
    good = ["a_rgb.png", "b_photo.jpg", "c_gray.png", "d_exif.jpg", "e_1x1.png", "f_cmyk.jpg"]
    return good, sorted(BAD_FILES)


def write_metadata(folder: Path, names: list[str]) -> Path:
    path = folder / "metadata.jsonl"
    with open(path, "w") as fh:
        for i, name in enumerate(names):
            fh.write(json.dumps({"file_name": name, "caption": f"a red circle number {i}."}) + "\n")
    return path


@pytest.fixture()
def mixed(tmp_path) -> tuple[Path, list[str], list[str]]:
    folder = tmp_path / "images"
    good, bad = make_mixed_folder(folder)
    write_metadata(folder, sorted(good + bad))
    return folder, good, bad


@pytest.fixture()
def saved_model(tmp_path, tiny_model, tiny_processor) -> Path:
    out = tmp_path / "model"
    tiny_model.generation_config.max_new_tokens = 5
    tiny_model.save_pretrained(out)
    tiny_processor.save_pretrained(out)
    return out


def _names_in(text: str, names: list[str]) -> list[str]:
    return [n for n in names if n in text]


# ------------------------------------------------------------------------------------------------ clipcap caption


def test_caption_cli_on_mixed_folder_captions_good_names_bad_exit_1_no_traceback(saved_model, mixed):
    folder, good, bad = mixed
    proc = subprocess.run(
        [sys.executable, "-m", "modeling_clipcap.cli", "caption", str(folder), "--model", str(saved_model)]
        + ["--batch_size", "3", "--max_new_tokens", "5"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [Path(r[0]).name for r in rows] == good  # every good image, in folder order, nothing else
    assert all(len(r) == 2 and r[1].strip() for r in rows)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad), proc.stderr
    for name, word in BAD_FILES.items():
        line = next(e for e in errors if e.startswith(f"error: {folder / name}: "))
        assert word in line, line
    assert f"{len(bad)} of {len(good) + len(bad)} file(s) could not be captioned" in proc.stderr


# ------------------------------------------------------------------------------------------------ clipcap evaluate


def _evaluate(capsys, model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    from modeling_clipcap.cli import main

    capsys.readouterr()
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--output_dir", str(out)]
    argv += ["--no_meteor", "--spice", "off", "--no_progress", "--max_new_tokens", "5", "--batch_size", "4"]
    status = main(argv + list(extra))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_evaluate_on_mixed_folder_fail_names_files_and_keeps_old_outputs(
    capsys, saved_model, mixed, tmp_path
):
    folder, good, bad = mixed
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "an earlier run"}\n')
    status, stdout, stderr = _evaluate(capsys, saved_model, folder / "metadata.jsonl", out)
    assert status == 2 and "Traceback" not in stderr
    assert sorted(_names_in(stderr, bad)) == sorted(STAT_BAD)  # found up front, listed together
    assert "2 of 11 images are missing or unreadable" in stderr and "--on_bad_image skip" in stderr
    assert json.loads((out / "metrics.json").read_text()) == {"from": "an earlier run"}
    assert not (out / "predictions.json").exists()
    # with the stat-detectable files gone, the first undecodable file stops the run, named, nothing written
    write_metadata(folder, sorted(good + ["h_truncated.jpg"]))
    status, _, stderr = _evaluate(capsys, saved_model, folder / "metadata.jsonl", out)
    assert status == 2 and "h_truncated.jpg" in stderr and "truncated" in stderr
    assert json.loads((out / "metrics.json").read_text()) == {"from": "an earlier run"}


def test_evaluate_on_mixed_folder_skip_lists_every_bad_file(capsys, saved_model, mixed, tmp_path):
    folder, good, bad = mixed
    out = tmp_path / "eval"
    status, stdout, stderr = _evaluate(
        capsys, saved_model, folder / "metadata.jsonl", out, "--on_bad_image", "skip"
    )
    assert status == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == good
    # one list, with its count, whether the reader dropped the file or decoding failed
    assert "skipped_images" not in metrics["data_report"]
    skipped = [Path(str(name)).name for name, _ in metrics["skipped_images"]]
    assert sorted(skipped) == bad and metrics["num_skipped_images"] == len(bad)
    assert f"bad images skipped: {len(bad)}" in stderr
    reasons = {Path(str(n)).name: r for n, r in metrics["skipped_images"]}
    for name in set(bad) - STAT_BAD:
        assert BAD_FILES[name] in reasons[name], reasons[name]
    assert metrics["num_images"] == len(good)


# ------------------------------------------------------------------------------------------------ data readers


def test_data_reader_on_mixed_folder_fail_skip_and_verify(mixed):
    from modeling_clipcap.data import CaptionDataError, load_caption_dataset

    folder, good, bad = mixed
    meta = folder / "metadata.jsonl"
    with pytest.raises(CaptionDataError) as info:
        load_caption_dataset(meta)
    assert sorted(_names_in(str(info.value), bad)) == sorted(STAT_BAD)
    assert "2 of 11" in str(info.value)
    with pytest.raises(CaptionDataError) as info:
        load_caption_dataset(meta, verify_images=True)  # decodes every image: all five named at once
    assert sorted(_names_in(str(info.value), bad)) == bad and "5 of 11" in str(info.value)
    ds, report = load_caption_dataset(meta, verify_images=True, on_bad_image="skip")
    assert sorted(ds["image_id"]) == good
    assert sorted(Path(n).name for n, _ in report.skipped_images) == bad
    assert "images skipped (on_bad_image='skip'): 5" in report.summary()
    for name, reason in report.skipped_images:
        word = {"g_empty.jpg": "empty", "k_folder.jpg": "not a file"}.get(
            Path(name).name, BAD_FILES[Path(name).name]
        )
        assert word in reason, (name, reason)


# ------------------------------------------------------------------------------------------------ embedding cache


def test_embedding_cache_on_mixed_folder_fail_writes_nothing_skip_lists(
    tiny_model, tiny_processor, mixed, tmp_path
):
    from modeling_clipcap.embedding_cache import build_embedding_cache

    folder, good, bad = mixed
    names = sorted(good + bad)
    paths = [str(folder / n) for n in names]
    cache_dir = tmp_path / "cache"
    kwargs = dict(keys=names, cache_dir=cache_dir, batch_size=4, show_progress=False)
    with pytest.raises(ImageLoadError) as info:
        build_embedding_cache(tiny_model, tiny_processor.image_processor, paths, **kwargs)
    assert _names_in(str(info.value), bad) and "--on_bad_image skip" in str(info.value)
    leftovers = sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []
    assert leftovers == [], leftovers  # no cache (not even a temporary folder) after the failed run
    cache = build_embedding_cache(
        tiny_model, tiny_processor.image_processor, paths, on_bad_image="skip", **kwargs
    )
    assert sorted(Path(n).name for n, _ in cache.skipped) == bad
    assert sorted(cache.keys) == good and cache.embeddings().shape == (len(good), 24)
    assert torch.isfinite(cache.embeddings()).all()
    again = build_embedding_cache(
        tiny_model, tiny_processor.image_processor, paths, on_bad_image="skip", **kwargs
    )
    assert again.num_encoded == 0 and sorted(Path(n).name for n, _ in again.skipped) == bad


# ------------------------------------------------------------------------------------------------ train.py


def _write_preset(folder: Path) -> Path:
    return write_tiny_preset(
        folder, {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "max_caption_length": 16}
    )


def test_train_on_mixed_folder_fail_then_skip_reports_count_and_list(mixed, tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "training"))
    import train

    folder, good, bad = mixed
    out = tmp_path / "run"
    argv = [
        "--config",
        str(_write_preset(tmp_path / "preset")),
        "--train_file",
        str(folder / "metadata.jsonl"),
    ]
    argv += [
        "--output_dir",
        str(out),
        "--embedding_cache_dir",
        str(tmp_path / "cache"),
        "--max_train_steps",
        "2",
    ]
    argv += ["--report_to", "none"]
    with pytest.raises(ValueError) as info:  # default policy: fail, naming the files
        train.main(argv)
    assert sorted(_names_in(str(info.value), bad)) == sorted(STAT_BAD)
    assert not (out / "model.safetensors").exists()
    capsys.readouterr()
    summary = train.main(argv + ["--on_bad_image", "skip"])
    printed = capsys.readouterr().out
    assert summary["skipped_images"] == len(bad)
    report = json.loads((out / "skipped_images.json").read_text())
    assert report["count"] == len(bad) and sorted(Path(n).name for n, _ in report["images"]) == bad
    assert f"bad images skipped: {len(bad)}" in printed
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ odd images


def _odd_images(folder: Path) -> dict[str, tuple[Path, Image.Image]]:
    """name -> (file, the RGB image it must become)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, Image.Image]] = {}
    gray = _noise((36, 28), 10, "L")
    gray.save(folder / "gray.png")
    out["grayscale"] = (folder / "gray.png", Image.merge("RGB", [gray] * 3))
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 255))
    for x in range(15):
        for y in range(30):
            rgba.putpixel((x, y), (0, 0, 255, 0))  # left half fully transparent -> white
    rgba.save(folder / "rgba.png")
    expected = Image.new("RGB", (30, 30), (255, 0, 0))
    expected.paste((255, 255, 255), (0, 0, 15, 30))
    out["rgba"] = (folder / "rgba.png", expected)
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0] + [10, 200, 30] + [0] * 762)
    pal.save(folder / "palette.gif")
    out["palette"] = (folder / "palette.gif", Image.new("RGB", (20, 20), (10, 200, 30)))
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))
    cmyk.save(folder / "cmyk.tif")
    out["cmyk"] = (folder / "cmyk.tif", cmyk.convert("RGB"))
    arr16 = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113 % 65536).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "sixteen.png")
    arr8 = np.rint(arr16 / 257.0).astype(np.uint8)
    out["16-bit"] = (folder / "sixteen.png", Image.fromarray(np.stack([arr8] * 3, -1), "RGB"))
    stored = _noise((40, 24), 11)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored.save(folder / "exif.png", exif=exif)
    out["exif-rotated"] = (folder / "exif.png", stored.transpose(Image.Transpose.ROTATE_270))
    Image.new("RGB", (1, 1), (12, 34, 56)).save(folder / "one.png")
    out["1x1"] = (folder / "one.png", Image.new("RGB", (1, 1), (12, 34, 56)))
    return out


def test_odd_images_converted_correctly_end_to_end(tmp_path, tiny_model, tiny_processor):
    """Through the package's door (``image_io.load_image``, what its commands call before the processor) every odd
    file gives the pixels of its hand-made RGB image, as a path, bytes or an ``Image.open`` object. The processor
    alone (the code a saved model carries) gives the same, except for 16-bit files, which only the door scales."""
    odd = _odd_images(tmp_path / "odd")
    for name, (path, expected) in odd.items():
        reference = tiny_processor(images=[expected], return_tensors="pt")["pixel_values"]
        with Image.open(path) as opened, Image.open(path) as opened_again:  # not yet converted
            sources = [load_image(path), load_image(path.read_bytes()), load_image(opened)]
            if name != "16-bit":
                sources += [path, path.read_bytes(), opened_again]
            for source in sources:
                pixel_values = tiny_processor(images=[source], return_tensors="pt")["pixel_values"]
                assert pixel_values.shape == (1, 3, 32, 32), name
                torch.testing.assert_close(pixel_values, reference, atol=0, rtol=0, msg=name)
    # all of them in one batch through generate == one at a time
    images = [load_image(p) for p, _ in odd.values()]
    batch = tiny_processor(images=images, return_tensors="pt")["pixel_values"]
    together = tiny_model.generate(pixel_values=batch, **GEN)
    for i, image in enumerate(images):
        alone = tiny_model.generate(pixel_values=tiny_processor(images=[image])["pixel_values"], **GEN)
        assert tiny_processor.batch_decode(alone) == tiny_processor.batch_decode(together[i : i + 1])


def test_processor_names_bad_files_and_lazy_truncated_pil_images(tmp_path, tiny_processor):
    folder = tmp_path / "bad"
    make_mixed_folder(folder)
    for name in BAD_FILES:  # the processor reads files with PIL (no image_io in a saved model's code)
        with pytest.raises(ValueError, match=rf"cannot read image .*{name}"):
            tiny_processor(images=[folder / "a_rgb.png", folder / name])
    lazy = Image.open(folder / "h_truncated.jpg")  # opens fine: the truncation shows only when decoding
    with pytest.raises(ValueError, match=r"h_truncated\.jpg.*truncated"):
        tiny_processor(images=lazy)
    with pytest.raises(ValueError, match="empty list"):
        tiny_processor(images=[])


# ------------------------------------------------------------------------------------------------ property-based


_MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"II*\x00",
]


@pytest.fixture(scope="module")
def module_processor():
    return build_tiny_processor(build_tiny_tokenizer())


def _check_pixel_values(pixel_values: torch.Tensor, batch: int) -> None:
    assert pixel_values.shape == (batch, 3, 32, 32) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(prefix=st.sampled_from(_MAGIC), payload=st.binary(max_size=300), as_pil=st.booleans())
def test_processor_random_bytes_only_image_load_error(module_processor, prefix, payload, as_pil):
    data = prefix + payload
    try:
        if as_pil:  # what a user gets from Image.open on a bad download, passed on unconverted
            try:
                source = Image.open(io.BytesIO(data))
            except Exception:  # Image.open itself refused it: not the processor's business
                return
        else:
            source = data
        pixel_values = module_processor(images=source, return_tensors="pt")["pixel_values"]
    except ValueError as err:  # the processor's one error for an unreadable image
        assert str(err).startswith("cannot read image"), err
        return
    _check_pixel_values(pixel_values, 1)


# valid encodings of every mode, with extreme aspect ratios and 1-pixel sides
_MODE_FORMATS = {
    "RGB": ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"],
    "RGBA": ["PNG", "TIFF", "WEBP"],
    "L": ["PNG", "JPEG", "TIFF"],
    "LA": ["PNG"],
    "P": ["PNG", "GIF"],
    "1": ["PNG", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "F": ["TIFF"],
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(sorted(_MODE_FORMATS)),
    width=st.sampled_from([1, 2, 3, 17, 64, 300]),
    height=st.sampled_from([1, 2, 5, 31, 64]),
    seed=st.integers(0, 1000),
    orientation=st.sampled_from([None, 1, 3, 6, 8]),
    data=st.data(),
)
def test_processor_random_valid_images_give_pixel_values(
    module_processor, mode, width, height, seed, orientation, data
):
    fmt = data.draw(st.sampled_from(_MODE_FORMATS[mode]))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random((height, width), dtype=np.float32), "F")
    else:
        img = _noise((width, height), seed, mode)
    kwargs = {}
    if orientation is not None and fmt in ("PNG", "JPEG", "TIFF", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    try:
        encoded = _encode(img, fmt, **kwargs)
    except (OSError, ValueError, KeyError):  # this PIL cannot write that mode in that format
        return
    pixel_values = module_processor(images=[encoded, Image.open(io.BytesIO(encoded))])["pixel_values"]
    _check_pixel_values(pixel_values, 2)
    assert torch.equal(pixel_values[0], pixel_values[1])  # bytes and an opened PIL image agree
    loaded = load_image(encoded)
    rotated = orientation in (6, 8) and "exif" in kwargs
    assert loaded.size == ((height, width) if rotated else (width, height))


# ------------------------------------------------------------------------------------------------ tensor inputs


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(pixel_values=torch.full((1, 3, 32, 32), float("nan"))), "NaN or infinite"),
        (dict(pixel_values=torch.full((1, 3, 32, 32), float("inf"))), "NaN or infinite"),
        (dict(pixel_values=[[0.0]]), "floating-point tensor"),
        (dict(image_embeds=torch.full((1, 24), float("-inf"))), "NaN or infinite"),
        (dict(image_embeds=torch.zeros(2, 24, dtype=torch.long)), "floating-point"),
        (dict(image_embeds=torch.zeros(24)), r"\(batch, 24\)"),
        (dict(image_embeds=torch.zeros(0, 24)), "empty batch"),
        (dict(image_embeds=torch.zeros(1, 512)), r"\(batch, 24\)"),
    ],
)
def test_more_bad_tensor_inputs_are_value_errors(tiny_model, inputs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        tiny_model(**inputs)


# ------------------------------------------------------------------------------------------------ untrusted checkpoints


class _WritesMarker:
    """Unpickling this calls ``open(path, "w")``: the file appears only if the pickle was executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_from_pretrained_never_runs_code_from_a_pickled_pytorch_model_bin(tmp_path, tiny_model):
    from safetensors.torch import load_file

    model_dir = tmp_path / "stranger"
    tiny_model.save_pretrained(model_dir)
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    # a legitimate pickle checkpoint still loads (transformers uses torch.load(weights_only=True))
    torch.save(state, model_dir / "pytorch_model.bin")
    loaded = ClipCapForConditionalGeneration.from_pretrained(model_dir)
    key = next(k for k in state if k.startswith("mapping_network.") and k.endswith("weight"))
    # files keep the 0.1.0 layout (mapping_network.*); the module lives under model.mapping_network
    assert torch.equal(loaded.mapping_network.state_dict()[key.removeprefix("mapping_network.")], state[key])
    # a malicious one is refused and never executed
    marker = tmp_path / "pwned"
    torch.save({**state, "payload": _WritesMarker(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(Exception) as info:
        ClipCapForConditionalGeneration.from_pretrained(model_dir)
    assert "weights_only" in str(info.value) or "Unpickl" in str(info.value), str(info.value)
    assert not marker.exists(), "from_pretrained executed code from pytorch_model.bin"
    # control: the payload is live, a full unpickle would have run it
    torch.load(model_dir / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_resuming_from_a_tampered_accelerate_checkpoint_never_runs_code(tmp_path):
    """Every pickle file of an ``accelerator.save_state`` folder (what train.py checkpoints hold), replaced
    by one that would run code: ``load_state`` refuses it and the code never runs; a lost RNG state is an
    error (or, with ``allow_rng_state_loss``, a warning), never a quiet loss of bit-exactness."""
    import json

    from accelerate import Accelerator

    from modeling_clipcap.checkpointing import TRAINING_STATE_NAME, CheckpointError, load_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    clean = tmp_path / "clean"
    accelerator.save_state(str(clean))
    pickles = sorted(p.name for p in clean.iterdir() if p.suffix in (".bin", ".pkl", ".pt"))
    assert "optimizer.bin" in pickles and any(n.startswith("random_states") for n in pickles), pickles
    accelerator.load_state(str(clean))  # the untampered folder loads
    import shutil

    for name in pickles:
        tampered = tmp_path / f"tampered-{name}"
        shutil.copytree(clean, tampered)
        marker = tmp_path / f"pwned-{name}"
        torch.save({"state": {}, "payload": _WritesMarker(marker)}, tampered / name)
        if name.startswith("random_states"):
            # Accelerate alone logs "Could not load random states" and goes on without them; train.py's
            # loader refuses (the resumed run would no longer be bit-exact) unless told to go on, then warns
            state = {"completed_steps": 1, "epoch": 0, "batches_in_epoch": 1, "num_processes": 1}
            state["total_batch_size"] = 4
            (tampered / TRAINING_STATE_NAME).write_text(json.dumps(state))
            expected = {"num_processes": 1, "total_batch_size": 4}
            with pytest.raises(CheckpointError, match=f"{name}.*--allow_rng_state_loss"):
                load_checkpoint(accelerator, tampered, expected)
            with pytest.warns(UserWarning, match="not bit-exactly"):
                assert load_checkpoint(accelerator, tampered, expected, allow_rng_state_loss=True) == state
            (clean / TRAINING_STATE_NAME).write_text(json.dumps(state))
            assert load_checkpoint(accelerator, clean, expected) == state  # the clean one: no error
            (clean / TRAINING_STATE_NAME).unlink()
        else:
            with pytest.raises(Exception, match="[Ww]eights only load failed"):
                accelerator.load_state(str(tampered))
        assert not marker.exists(), f"load_state executed code from {name}"
    # control: the payload is live, a full unpickle would have run it
    torch.load(tmp_path / "tampered-optimizer.bin" / "optimizer.bin", weights_only=False)
    assert (tmp_path / "pwned-optimizer.bin").exists()


# ------------------------------------------------------------------------------------------------ long runs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096  # resident pages; page size 4 KiB on Linux x86-64


@pytest.mark.slow
def test_captioning_2000_images_keeps_memory_flat_and_throughput_steady(tmp_path, tiny_model, tiny_processor):
    from modeling_clipcap.captioning import caption_images

    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 2000
    for i in range(n):  # small images of varying sizes and kinds (some bad), like a scraped folder
        w, h = int(rng.integers(8, 96)), int(rng.integers(8, 96))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        if i % 97 == 0:
            (folder / f"{i:05d}.jpg").write_bytes(b"not an image")
        elif i % 3 == 0:
            img.convert("L").save(folder / f"{i:05d}.png")
        else:
            img.save(folder / f"{i:05d}.jpg", quality=85)
    paths = sorted(str(p) for p in folder.iterdir())
    every, warmup = 250, 500
    # (images done, RSS bytes, wall seconds, CPU seconds of this process)
    samples: list[tuple[int, int, float, float]] = []
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    done = failed = 0
    for _, caption, error in caption_images(tiny_model, tiny_processor, paths, batch_size=16, **GEN):
        done += 1
        failed += error is not None
        assert (caption is None) == (error is not None)
        if done % every == 0:
            samples.append((done, _rss_bytes(), time.perf_counter() - wall0, time.process_time() - cpu0))
    assert done == n and failed == len(range(0, n, 97))
    base = next(s[1] for s in samples if s[0] == warmup)
    peak_after = max(s[1] for s in samples if s[0] >= warmup)
    growth = (peak_after - base) / base
    pairs = list(zip(samples, samples[1:]))
    wall_rates = [every / (b[2] - a[2]) for a, b in pairs]
    # throughput per CPU second: what this process does with the CPU it gets, so other jobs on a
    # shared machine do not make the test flaky (wall-clock rates are reported too)
    cpu_rates = [every / (b[3] - a[3]) for a, b in pairs]
    report = {
        "rss_mib": [round(s[1] / 2**20, 1) for s in samples],
        "growth_after_warmup": round(growth, 4),
        "images_per_wall_s": [round(r, 1) for r in wall_rates],
        "images_per_cpu_s": [round(r, 1) for r in cpu_rates],
    }
    print(json.dumps(report))
    assert growth < 0.05, report
    earlier, later = cpu_rates[: len(cpu_rates) // 2], cpu_rates[len(cpu_rates) // 2 :]
    assert min(later) > 0.6 * float(np.median(earlier)), report  # no slow-down as the run goes on


# ------------------------------------------------------------------------------------------------ the doc


def test_reliability_doc_names_only_existing_tests():
    """Every ``tests/<file>.py::<test>`` named in docs/reliability.md is a test function of that file."""
    import ast
    import re

    text = (REPO_ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(named) >= 60, len(named)
    defined: dict[str, set[str]] = {}
    for file in {f for f, _ in named}:
        tree = ast.parse((REPO_ROOT / file).read_text())
        defined[file] = {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")
        }
    missing = sorted(f"{f}::{t}" for f, t in named if t not in defined[f])
    assert missing == [], missing
