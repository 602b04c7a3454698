"""Round trips through every Auto class, the processor, the pipeline, and remote-code loading."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_processor, tiny_clipcap_config
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapProcessor


def images(n=3, size=(40, 30)):
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (250, 250, 0)]
    return [Image.new("RGB", size, colours[i % len(colours)]) for i in range(n)]


@pytest.fixture()
def saved_model_dir(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(
        tiny_clipcap_config(len(tiny_tokenizer), mapping_type="transformer")
    )
    model.eval().save_pretrained(tmp_path / "model")
    build_tiny_processor(tiny_tokenizer).save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


def test_saved_directory_has_safetensors_auto_map_and_code(saved_model_dir):
    path, _ = saved_model_dir
    files = set(os.listdir(path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert {"configuration_clipcap.py", "modeling_clipcap.py", "processing_clipcap.py"} <= files
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_clipcap.ClipCapConfig"
    assert auto_map["AutoModel"] == "modeling_clipcap.ClipCapForConditionalGeneration"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_clipcap.ClipCapForConditionalGeneration"
    processor_files = [
        f for f in files if f.startswith("processor_config") or f == "preprocessor_config.json"
    ]
    assert processor_files, files
    blob = "".join((path / f).read_text() for f in processor_files)
    assert "processing_clipcap.ClipCapProcessor" in blob


#: The code a saved model carries is the model's own folder, as in transformers: configuration, modeling,
#: processing, the towers, the mapping networks and the compat adapter. transformers copies each file these import
#: relatively, so a new relative import (of training, hub or image-file code, say) fails the test below.
MODEL_FOLDER_CODE = {
    "configuration_clipcap.py",
    "modeling_clipcap.py",
    "processing_clipcap.py",
    "towers.py",
    "mapping_networks.py",
    "compat.py",
}


@pytest.mark.parametrize("with_vision", [True, False], ids=["tower", "embeddings-only"])
def test_saved_code_is_exactly_the_model_folder(tmp_path, tiny_tokenizer, with_vision):
    model = ClipCapForConditionalGeneration(tiny_clipcap_config(len(tiny_tokenizer), with_vision=with_vision))
    model.save_pretrained(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").glob("*.py")} == MODEL_FOLDER_CODE - {
        "processing_clipcap.py"
    }
    build_tiny_processor(tiny_tokenizer).save_pretrained(tmp_path / "model")
    code = {p.name: p.read_text() for p in (tmp_path / "model").iterdir() if p.suffix == ".py"}
    assert set(code) == MODEL_FOLDER_CODE
    for name, text in code.items():  # nor may it import the package, which a user of the folder lacks
        assert not re.search(r"^\s*(from|import) modeling_clipcap\b", text, flags=re.MULTILINE), name


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForImageTextToText])
def test_auto_class_round_trip_gives_identical_outputs(saved_model_dir, auto_class):
    path, original = saved_model_dir
    loaded = auto_class.from_pretrained(path).eval()
    assert isinstance(loaded, ClipCapForConditionalGeneration)
    assert isinstance(AutoConfig.from_pretrained(path), ClipCapConfig)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    pixel_values = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    torch.testing.assert_close(
        loaded(pixel_values=pixel_values, input_ids=ids).logits,
        original(pixel_values=pixel_values, input_ids=ids).logits,
    )
    kwargs = dict(num_beams=2, max_new_tokens=5)
    assert torch.equal(
        loaded.generate(pixel_values=pixel_values, **kwargs),
        original.generate(pixel_values=pixel_values, **kwargs),
    )


def test_auto_processor_round_trip_and_batch_decode(saved_model_dir, tiny_tokenizer):
    path, model = saved_model_dir
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(processor, ClipCapProcessor)
    assert processor.tokenizer.pad_token == processor.tokenizer.eos_token
    inputs = processor(images=images(3), return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    direct = build_tiny_processor(tiny_tokenizer)(images=images(3), return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], direct["pixel_values"])
    ids = model.generate(**inputs, max_new_tokens=6)
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    assert len(captions) == 3
    eos = processor.tokenizer.eos_token_id
    expected = [tiny_tokenizer.decode([t for t in row.tolist() if t != eos]).strip() for row in ids]
    assert captions == expected
    # text prompts are left padded for generation
    text = processor(text=["a red", "two dogs playing"], return_tensors="pt")
    assert text["attention_mask"][0, 0] == 0 and text["attention_mask"][1, 0] == 1


def test_processor_rejects_empty_input(tiny_processor):
    with pytest.raises(ValueError, match="images"):
        tiny_processor()
    with pytest.raises(ValueError, match="empty"):
        tiny_processor(images=[])


def test_pipeline_captions_pil_images(saved_model_dir):
    path, model = saved_model_dir
    captioner = pipeline("image-captioning", model=str(path))
    outs = captioner(images(2), max_new_tokens=5)
    assert len(outs) == 2
    processor = AutoProcessor.from_pretrained(path)
    ids = model.generate(**processor(images=images(2), return_tensors="pt"), max_new_tokens=5)
    expected = processor.batch_decode(ids)
    got = [o[0]["generated_text"] if isinstance(o, list) else o["generated_text"] for o in outs]
    assert got == expected


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_clipcap" or name.startswith("modeling_clipcap."):
                raise ModuleNotFoundError("modeling_clipcap is hidden for this test", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import modeling_clipcap  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the package is importable: the test would prove nothing")
    """
)


def run_without_package(code: str, cwd, env=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``import modeling_clipcap`` fails."""
    env = dict(env or os.environ)
    env.pop("PYTHONPATH", None)
    env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
        )
    return proc


def test_trust_remote_code_loading_without_the_package(saved_model_dir, tmp_path):
    path, model = saved_model_dir
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    expected = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=5)
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent: white once read
    proc = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        path = {str(path)!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        other = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__name__ == "ClipCapForConditionalGeneration"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__name__ == "ClipCapProcessor"
        pixel_values = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        ids = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=5)
        # the processor reads a file without the package (its image_io is not shipped)
        torch.save(processor(images=[{str(tmp_path / "clear.png")!r}])["pixel_values"], "remote_pixels.pt")
        print(json.dumps(ids.tolist()))
        """,
        cwd=tmp_path,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected.tolist()
    white = AutoProcessor.from_pretrained(path)(images=[Image.new("RGB", (20, 20), "white")])["pixel_values"]
    assert torch.equal(torch.load(tmp_path / "remote_pixels.pt", weights_only=True), white)


def test_processor_decodes_paths_and_converts_modes(tiny_processor, real_photos, tmp_path):
    """The shipped processor reads a path or bytes itself (PIL, without the package's image_io): upright RGB,
    transparency on white, the pixels the package's reader gives for the real photos (EXIF-rotated, greyscale,
    CMYK); a file it cannot read is a ValueError naming it."""
    from modeling_clipcap.image_io import load_image

    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent: composited onto white
    out = tiny_processor(images=[rgba, str(real_photos[0]), Image.new("RGB", (20, 20), "white")])
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    torch.testing.assert_close(out["pixel_values"][0], out["pixel_values"][2])
    for photo in real_photos:
        expected = tiny_processor(images=[load_image(photo)])["pixel_values"]
        for source in (str(photo), photo, photo.read_bytes()):
            assert torch.equal(tiny_processor(images=[source])["pixel_values"], expected), photo.name
        with Image.open(photo) as opened:  # as opened, not yet rotated or converted
            assert torch.equal(tiny_processor(images=opened)["pixel_values"], expected), photo.name
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    for source in (str(bad), tmp_path / "missing.jpg"):
        with pytest.raises(ValueError, match=r"cannot read image .*(broken|missing)\.jpg"):
            tiny_processor(images=[source])
