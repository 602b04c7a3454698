"""ONNX export (``clipcap export``) and captioning with ONNX Runtime (``--backend onnx``, ``--int8``), tiny models.

One export per model, shared by the module's tests (exporting is the slow part): the MLP mapper with a tiny GPT-2
through the command line, with int8 graphs; the transformer mapper and a Llama language model behind ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_processor, build_tiny_tokenizer, tiny_clipcap_config
from test_families import build

from modeling_clipcap import ClipCapForConditionalGeneration
from modeling_clipcap.captioning import CaptionInputError, caption_items, load_captioner
from modeling_clipcap.cli import main
from modeling_clipcap.onnx_export import MANIFEST_NAME, ExportError, export_onnx
from modeling_clipcap.onnx_runtime import ClipCapOnnxForConditionalGeneration, OnnxExportError

GENERATE = dict(max_new_tokens=6, pad_token_id=0)


def sharpen(model: ClipCapForConditionalGeneration) -> ClipCapForConditionalGeneration:
    """Wider token embeddings (tied to the output layer): random tiny models then write varied tokens instead of
    one token repeated, so that equal tokens say something."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(std=1.0)
    return model.eval()


def pixels(batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    brightness = torch.tensor([(1.0, -1.0, 0.0)[i % 3] for i in range(batch)]).view(-1, 1, 1, 1)
    return torch.randn(batch, 3, 32, 32, generator=g) + brightness


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def mlp_export(tokenizer, tmp_path_factory):
    """(PyTorch model, its saved folder, its export with int8 graphs), exported by ``clipcap export``."""
    torch.manual_seed(0)
    model = sharpen(ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer))))
    model.generation_config.pad_token_id = 0
    saved = tmp_path_factory.mktemp("mlp_model")
    model.save_pretrained(saved)
    build_tiny_processor(tokenizer).save_pretrained(saved)
    out = tmp_path_factory.mktemp("mlp_onnx")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert (
            main(["export", "--model", str(saved), "--output_dir", str(out), "--int8", "--no_progress"]) == 0
        )
    assert "clipcap export:" not in stderr.getvalue()  # --no_progress
    return model, saved, out


def assert_same_tokens(model, exported: Path, **extra) -> None:
    onnx_model = ClipCapOnnxForConditionalGeneration.from_pretrained(exported)
    inputs = pixels()
    for kwargs in (dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)):
        expected = model.generate(pixel_values=inputs, **GENERATE, **kwargs, **extra)
        got = onnx_model.generate(pixel_values=inputs, **GENERATE, **kwargs, **extra)
        assert torch.equal(got, expected), kwargs
    assert len({tuple(row) for row in expected.tolist()}) > 1, (
        "the test model writes one caption for all images"
    )


def test_export_gives_the_tokens_of_generate_greedy_and_beam(mlp_export):
    model, _, exported = mlp_export
    assert_same_tokens(model, exported)


def test_sampling_and_generate_options_go_through_transformers_generate(mlp_export):
    model, _, exported = mlp_export
    onnx_model = ClipCapOnnxForConditionalGeneration.from_pretrained(exported)
    inputs = pixels()
    runs = []
    for m in (model, onnx_model):
        torch.manual_seed(7)
        runs.append(
            m.generate(pixel_values=inputs, do_sample=True, top_k=20, num_return_sequences=2, **GENERATE)
        )
    assert torch.equal(runs[0], runs[1])
    out = onnx_model.generate(
        pixel_values=inputs, num_beams=2, return_dict_in_generate=True, output_scores=True, **GENERATE
    )
    expected = model.generate(
        pixel_values=inputs, num_beams=2, return_dict_in_generate=True, output_scores=True, **GENERATE
    )
    assert torch.allclose(out.sequences_scores, expected.sequences_scores, atol=1e-4)
    with pytest.raises(ValueError, match="pixel_values alone"):
        onnx_model.generate(pixel_values=inputs, image_embeds=torch.randn(4, 24))
    with pytest.raises(ValueError, match="`use_cache` is not supported here"):
        onnx_model.generate(pixel_values=inputs, use_cache=False)


def test_caption_backend_onnx_and_int8_through_the_captioning_path(mlp_export, tmp_path, capsys):
    from PIL import Image

    model, saved, exported = mlp_export
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))

    def caption(*flags: str) -> list[str]:
        assert main(["caption", *paths, "--json", "--no_progress", "--max_new_tokens", "5", *flags]) == 0
        return [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]

    torch_captions = caption("--model", str(saved))
    assert caption("--model", str(exported), "--backend", "onnx") == torch_captions
    assert caption("--model", str(exported)) == torch_captions  # an exported folder picks the ONNX backend
    int8_captions = caption("--model", str(exported), "--backend", "onnx", "--int8")
    same = sum(a == b for a, b in zip(int8_captions, torch_captions))
    print(f"int8 vs fp32 on the tiny model: {same}/{len(paths)} captions the same: {int8_captions}")
    assert len(int8_captions) == len(paths)


def test_int8_graphs_are_quantized_and_caption(mlp_export):
    import onnx

    model, _, exported = mlp_export
    manifest = json.loads((exported / MANIFEST_NAME).read_text())
    assert set(manifest["int8_graphs"]) == {"image_encoder", "decoder"}
    ops = {node.op_type for node in onnx.load(exported / "decoder.int8.onnx").graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops or "DynamicQuantizeMatMul" in ops, ops
    int8 = ClipCapOnnxForConditionalGeneration.from_pretrained(exported, int8=True)
    assert int8.int8
    inputs = pixels()
    got = int8.generate(pixel_values=inputs, **GENERATE)
    expected = model.generate(pixel_values=inputs, **GENERATE)
    assert got.shape[0] == expected.shape[0]
    same = sum(a == b for a, b in zip(got.tolist(), expected.tolist()))
    print(f"int8 vs fp32 greedy tokens on the tiny model: {same}/{len(expected)} sequences the same")


def test_pipeline_and_caption_items_take_the_export(mlp_export):
    from transformers import pipeline

    model, saved, exported = mlp_export
    onnx_model, processor = load_captioner(exported)
    assert isinstance(onnx_model, ClipCapOnnxForConditionalGeneration)
    images = [{"image_id": i, "pixel_values": p} for i, p in enumerate(pixels(3))]
    got = [c for _, c, _ in caption_items(onnx_model, processor, images, num_beams=2, max_new_tokens=5)]
    expected = [c for _, c, _ in caption_items(model, processor, images, num_beams=2, max_new_tokens=5)]
    assert got == expected
    from PIL import Image

    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    captioner = pipeline(
        "image-captioning",
        model=onnx_model,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    torch_captioner = pipeline("image-captioning", model=str(saved))
    expected = torch_captioner(image, max_new_tokens=5)
    assert captioner(image, max_new_tokens=5) == expected
    from_folder = pipeline("image-captioning", model=str(exported))
    assert isinstance(from_folder.model, ClipCapOnnxForConditionalGeneration)
    assert from_folder(image, max_new_tokens=5) == expected


def test_app_captions_and_prefix_tokens_from_the_export(mlp_export, tmp_path):
    """``clipcap app``'s captioning step (captions and the prefix read back as tokens) on the exported folder."""
    from PIL import Image

    from modeling_clipcap.app import Decoding, caption_files

    _, saved, exported = mlp_export
    paths = []
    for i, value in enumerate((30, 120, 220)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(paths[-1])
    decoding = Decoding(mode="beam search", num_beams=2, num_captions=2, max_new_tokens=4)
    results = {}
    for name, folder in (("onnx", exported), ("pytorch", saved)):
        model, processor = load_captioner(folder)
        results[name] = caption_files(model, processor, paths, decoding, batch_size=2)
    assert results["onnx"] == results["pytorch"]
    assert len(results["onnx"][0]["prefix_tokens"]) == 4


def test_load_captioner_refuses_wrong_backend_and_flags(mlp_export):
    _, saved, exported = mlp_export
    with pytest.raises(CaptionInputError, match="needs a folder written by `clipcap export`"):
        load_captioner(saved, backend="onnx")
    with pytest.raises(CaptionInputError, match="is an ONNX export"):
        load_captioner(exported, backend="pytorch")
    with pytest.raises(CaptionInputError, match="--int8 runs the int8 graphs"):
        load_captioner(saved, int8=True)
    with pytest.raises(CaptionInputError, match="float32"):
        load_captioner(exported, dtype="bfloat16")


# ------------------------------------------------------------------ bad exported folders


@pytest.fixture()
def copy_of_export(mlp_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(mlp_export[2], folder)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def test_missing_graph_is_named(copy_of_export):
    (copy_of_export / "decoder.onnx").unlink()
    with pytest.raises(
        OnnxExportError, match=r"decoder graph .*decoder.onnx is missing; export the model again"
    ):
        ClipCapOnnxForConditionalGeneration.from_pretrained(copy_of_export)


def test_truncated_graph_is_named(copy_of_export):
    path = copy_of_export / "image_encoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(
        OnnxExportError, match="image_encoder graph .* bytes but the manifest says .* truncated"
    ):
        ClipCapOnnxForConditionalGeneration.from_pretrained(copy_of_export)
    with pytest.raises(CaptionInputError, match="truncated"):  # the captioning path says the same
        load_captioner(copy_of_export)


def test_changed_graph_or_manifest_is_refused(copy_of_export):
    manifest = _manifest(copy_of_export)
    manifest["graphs"]["decoder"]["sha256"] = "0" * 64
    (copy_of_export / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(OnnxExportError, match="does not match the SHA-256"):
        ClipCapOnnxForConditionalGeneration.from_pretrained(copy_of_export)


def test_graph_of_another_kind_is_refused_by_its_names(copy_of_export):
    """A graph swapped for another one of the export, with a manifest that agrees on size and hash: the input and
    output names give it away."""
    shutil.copy(copy_of_export / "embed_tokens.onnx", copy_of_export / "image_encoder.onnx")
    manifest = _manifest(copy_of_export)
    manifest["graphs"]["image_encoder"].update(
        {k: manifest["graphs"]["embed_tokens"][k] for k in ("size", "sha256")}
    )
    (copy_of_export / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(OnnxExportError, match=r"has inputs \['input_ids'\].*does not belong to this export"):
        ClipCapOnnxForConditionalGeneration.from_pretrained(copy_of_export)


def test_config_of_another_model_and_other_manifests_are_refused(copy_of_export, tmp_path):
    config = json.loads((copy_of_export / "config.json").read_text())
    config["prefix_length"] = 7
    (copy_of_export / "config.json").write_text(json.dumps(config))
    with pytest.raises(OnnxExportError, match="prefix_length 7 .* exported with 4"):
        ClipCapOnnxForConditionalGeneration.from_pretrained(copy_of_export)
    (copy_of_export / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OnnxExportError, match="is not a clipcap-onnx manifest"):
        ClipCapOnnxForConditionalGeneration.from_pretrained(copy_of_export)
    with pytest.raises(OnnxExportError, match="not an ONNX export; write one with `clipcap export"):
        ClipCapOnnxForConditionalGeneration.from_pretrained(tmp_path)


def test_int8_needs_int8_graphs(copy_of_export):
    manifest = _manifest(copy_of_export)
    manifest["int8_graphs"] = {}
    (copy_of_export / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(OnnxExportError, match="has no int8 graphs; export with them: .*--int8"):
        ClipCapOnnxForConditionalGeneration.from_pretrained(copy_of_export, int8=True)


def test_export_refuses_models_it_cannot_export(tokenizer, tmp_path):
    model = ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer), with_vision=False))
    with pytest.raises(ExportError, match="no vision tower"):
        export_onnx(model, tmp_path, processor=build_tiny_processor(tokenizer))
    assert main(["export", "--model", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")]) == 2
    with pytest.raises(ExportError, match="is the model folder itself"):
        export_onnx(tmp_path, tmp_path)


def test_missing_onnx_packages_name_the_extra(tokenizer, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a)
    )
    model = ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer)))
    with pytest.raises(ExportError, match=r"need onnxscript, .*pip install \"modeling_clipcap\[onnx\]\""):
        export_onnx(model, tmp_path)
    with pytest.raises(OnnxExportError, match=r"modeling_clipcap\[onnx\]"):
        ClipCapOnnxForConditionalGeneration.from_pretrained(tmp_path)


# ------------------------------------------------------------------ the other mapper, another language model


@pytest.mark.slow
def test_transformer_mapper_export_gives_the_tokens_of_generate(tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = sharpen(
        ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer), mapping_type="transformer"))
    )
    model.save_pretrained(tmp_path / "model")
    build_tiny_processor(tokenizer).save_pretrained(tmp_path / "model")
    assert main(["export", "--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "onnx")]) == 0
    assert "clipcap export: done" in capsys.readouterr().err  # progress lines by default
    assert_same_tokens(model, tmp_path / "onnx")


@pytest.mark.slow
def test_llama_language_model_export_gives_the_tokens_of_generate(tokenizer, tmp_path):
    model = sharpen(build("clip_vision_model", "llama", len(tokenizer), mapping_type="transformer"))
    export_onnx(model, tmp_path, processor=build_tiny_processor(tokenizer), progress=False)
    assert_same_tokens(model, tmp_path)
