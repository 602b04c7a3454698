"""Any image tower x any causal LM, end to end (issue 16): train.py, ``clipcap caption`` and ``clipcap evaluate`` on
non-CLIP, non-GPT-2 pairs built from local tiny checkpoints; the image processor that comes with each tower family;
SigLIP2's extra processor outputs through captioning; bad combinations named clearly.

Everything is built in the test (tiny random configs, a tiny BPE tokenizer, synthetic images): no network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_tokenizer, tiny_text_config
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapProcessor
from modeling_clipcap.towers import VISION_FAMILIES, default_image_processor

sys.path.insert(0, str(REPO_ROOT / "training"))

import synthetic_data  # noqa: E402

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
ROPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128)  # fmt: skip

#: (tower, LM, mapping_input, what one cached row holds). ConvNeXt at 32 px: a 4x4 map of 16 channels after its
#: stride-4 stem and one down-sampling stage, flattened to 16 tokens of width 16.
PAIRS = [
    ("siglip", "llama", "pooled", (32,)),
    ("convnext", "qwen2", "tokens", (16, 16)),
]


def _save_tower(kind: str, folder: Path) -> None:
    """A full SigLIP checkpoint with its image processor, or a ConvNeXt classifier saved without one."""
    from transformers import (
        AutoModelForImageClassification,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
    )

    torch.manual_seed(0)
    if kind == "siglip":
        config = SiglipConfig(vision_config=dict(VIT, image_size=32, patch_size=8),
                              text_config=dict(VIT, vocab_size=99))  # fmt: skip
        SiglipModel(config).save_pretrained(folder)
        SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    else:  # the trainer must fall back to ConvNeXt's own image processor, sized from the config (32 px)
        config = AutoConfig.for_model(
            "convnext", hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32
        )
        AutoModelForImageClassification.from_config(config).save_pretrained(folder)


def _save_lm(kind: str, folder: Path, tokenizer) -> None:
    vocab = len(tokenizer)
    ids = dict(bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model(kind, vocab_size=vocab, **ROPE, **ids)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("families_e2e")
    tokenizer = build_tiny_tokenizer()
    synthetic_data.write_to_disk(root / "data", sizes={"train": 8, "validation": 3}, show_progress=False)
    for tower, lm, _, _ in PAIRS:
        _save_tower(tower, root / tower)
        _save_lm(lm, root / lm, tokenizer)
    return root


def _train(setup: Path, tower: str, lm: str, mapping_input: str, out: Path) -> dict:
    import train

    mapper = ["--mapping_type", "transformer"] if mapping_input == "tokens" else ["--mapping_type", "mlp"]
    return train.main(
        [
            "--vision_model_name_or_path", str(setup / tower), "--text_model_name_or_path", str(setup / lm),
            "--mapping_input", mapping_input, *mapper, "--prefix_length", "3", "--clip_length", "2",
            "--train_file", str(setup / "data"), "--output_dir", str(out),
            "--embedding_cache_dir", str(out.parent / f"{out.name}-cache"),
            "--max_train_steps", "10", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
            "--num_warmup_steps", "1", "--max_caption_length", "24", "--max_new_tokens", "8",
        ]
    )  # fmt: skip


@pytest.mark.slow  # two tiny training runs, captioning and evaluation: about 40 s on 2 busy cores
@pytest.mark.parametrize("tower, lm, mapping_input, row_shape", PAIRS)
def test_train_caption_evaluate_on_a_non_clip_non_gpt2_pair(setup, tmp_path, capsys, tower, lm, mapping_input,
                                                            row_shape):  # fmt: skip
    import pyarrow.parquet as pq

    from modeling_clipcap.cli import main as clipcap
    from modeling_clipcap.shards import EMBEDDING_COLUMNS, embedding_values

    out = tmp_path / "run"
    summary = _train(setup, tower, lm, mapping_input, out)
    losses = [
        json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert summary["completed_steps"] == 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    # the cache stored what the mapper consumes: (D,) pooled embeddings or (N, D) token features per image
    stats = summary["embedding_cache"]["Encoding train images"]
    assert stats["encoded"] == 8 and stats["mapping_input"] == mapping_input
    info = json.loads((Path(stats["path"]) / "cache_info.json").read_text())
    assert info["mapping_input"] == mapping_input and tuple(info["embedding_shape"]) == row_shape
    table = pq.read_table(Path(stats["path"]) / "embeddings.parquet")  # the cache's layout (format 3)
    assert tuple(embedding_values(table[EMBEDDING_COLUMNS[mapping_input]]).shape) == (8, *row_shape)

    # the saved model: the pair's own parts and the tower's own image processor, captioning through the public API
    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert (
        model.config.vision_config.model_type
        == {"siglip": "siglip_vision_model", "convnext": "convnext"}[tower]
    )
    assert model.config.mapping_input == mapping_input
    assert (
        type(model.language_model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[lm]
    )
    assert type(processor.image_processor).__name__.startswith(
        {"siglip": "Siglip", "convnext": "ConvNext"}[tower]
    )
    images = sorted((setup / "data" / "validation").glob("*.png"))
    inputs = processor(images=[Image.open(p) for p in images], return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (32, 32)
    api = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    assert len(api) == 3 and all(isinstance(c, str) and c.strip() for c in api), (
        api
    )  # a caption each, not empty

    # clipcap caption gives the public API's captions; clipcap evaluate scores the same model
    capsys.readouterr()
    assert clipcap(["caption", *map(str, images), "--model", str(out), "--json", "--quiet"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["caption"] for x in lines] == [" ".join(c.split()) for c in api]
    evaluation = tmp_path / "eval"
    status = clipcap(["evaluate", "--model", str(out), "--data", str(setup / "data"), "--split", "validation",
                      "--output_dir", str(evaluation), "--no_meteor", "--spice", "off", "--no_progress"])  # fmt: skip
    assert status == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert isinstance(metrics["CIDEr"], float) and 0 <= metrics["CIDEr"] <= 10, metrics  # scored, not skipped
    assert "CIDEr" not in metrics["skipped"] and metrics["num_images"] == 3
    predictions = json.loads((evaluation / "predictions.json").read_text())
    # the captions scored are the model's, one non-empty caption per validation image
    assert sorted(p["caption"] for p in predictions) == sorted(" ".join(c.split()) for c in api)


# ----------------------------------------------------------------------------- image processors


@pytest.mark.parametrize(
    "family, expected",
    [("convnext", "ConvNextImageProcessorPil"), ("resnet", "ConvNextImageProcessorPil"),
     ("dinov2", "BitImageProcessorPil"), ("siglip_vision_model", "SiglipImageProcessorPil"),
     ("vit", "ViTImageProcessorPil"), ("siglip2_vision_model", "Siglip2ImageProcessorPil")],
)  # fmt: skip
def test_the_training_processor_is_the_towers_own(family, expected, tmp_path):
    """Without a saved image processor, train.py's processor is the tower family's own class, sized from its config
    (not CLIP's): ConvNeXt and ResNet get ConvNeXt's, DINOv2 BiT's with ImageNet statistics."""
    from modeling_clipcap.hub import load_training_processor

    cnn = dict(hidden_sizes=[8, 16], depths=[1, 1])
    sizes = {"resnet": dict(cnn, embedding_size=8), "convnext": dict(cnn, num_stages=2, image_size=32),
             "siglip2_vision_model": dict(VIT, num_patches=16, patch_size=8)}  # fmt: skip
    vision = AutoConfig.for_model(family, **sizes.get(family, dict(VIT, image_size=32, patch_size=8)))
    text = tiny_text_config(len(build_tiny_tokenizer(tmp_path / "tok")))
    mapping = dict(mapping_type="transformer", mapping_input="tokens", mapping_num_heads=4)
    config = ClipCapConfig(vision_config=vision, text_config=text, prefix_length=2,
                           **(mapping if family == "siglip2_vision_model" else {}))  # fmt: skip
    model = ClipCapForConditionalGeneration(config)
    processor = load_training_processor(model, tokenizer_sources=(str(tmp_path / "tok"),))
    assert type(processor.image_processor).__name__ == expected
    assert VISION_FAMILIES[family].image_processor == expected
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    inputs = processor(images=[image], return_tensors="pt")
    side = 224 if family == "resnet" else 32  # ResNet configs carry no image size
    if family == "siglip2_vision_model":
        assert inputs["pixel_values"].shape == (1, 16, 3 * 64) and "spatial_shapes" in inputs
    else:
        assert inputs["pixel_values"].shape == (1, 3, side, side)
    if family == "dinov2":
        assert list(processor.image_processor.image_mean) == [0.485, 0.456, 0.406]  # ImageNet, not CLIP's
    with torch.no_grad():  # what it gives fits the tower
        features = model.get_image_features(**inputs)
    assert features.last_hidden_state.shape[0] == 1


def test_a_tower_saved_without_an_image_processor_gets_its_familys(tmp_path):
    from transformers import ResNetForImageClassification

    config = AutoConfig.for_model("resnet", hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    build_tiny_tokenizer(tmp_path / "tok")
    processor = ClipCapProcessor.from_vision_text_pretrained(str(tmp_path / "resnet"), str(tmp_path / "tok"))
    assert type(processor.image_processor).__name__ == "ConvNextImageProcessorPil"
    assert type(default_image_processor(config)) is type(processor.image_processor)


# ----------------------------------------------------------------------------- SigLIP2 through captioning


def test_siglip2_captioning_passes_the_mask_and_shapes(monkeypatch):
    """caption_batch hands every processor output to generate: SigLIP2's patches, pixel_attention_mask and
    spatial_shapes; the captions equal generate's on the processor's full output."""
    from transformers import Siglip2ImageProcessorPil

    from modeling_clipcap.captioning import caption_batch

    tokenizer = build_tiny_tokenizer()
    tower = AutoConfig.for_model("siglip2_vision_model", **VIT, num_patches=16, patch_size=8)
    config = ClipCapConfig(vision_config=tower, text_config=tiny_text_config(len(tokenizer)), prefix_length=3)
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config).eval()
    processor = ClipCapProcessor(Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16), tokenizer)
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (20, 60), (20, 20, 200))]
    seen: list[set[str]] = []
    generate = model.generate

    def recording_generate(**kwargs):
        seen.append({k for k, v in kwargs.items() if torch.is_tensor(v)})
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    captions = caption_batch(model, processor, images=images, max_new_tokens=4, do_sample=False)
    assert seen == [{"pixel_values", "pixel_attention_mask", "spatial_shapes"}]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["pixel_attention_mask"].sum(1).tolist() == [12, 12] and inputs[
        "spatial_shapes"
    ].tolist() == [
        [3, 4],
        [6, 2],
    ]
    expected = processor.batch_decode(generate(**inputs, max_new_tokens=4, do_sample=False))
    assert captions == [" ".join(c.split()) for c in expected]
    assert captions[0] != captions[1]  # the two images' captions differ: a swap would fail
    # precomputed pixels with their mask and shapes (training's validation path) give the same captions
    again = caption_batch(
        model,
        processor,
        pixel_values=inputs["pixel_values"],
        image_inputs={
            "pixel_attention_mask": inputs["pixel_attention_mask"],
            "spatial_shapes": inputs["spatial_shapes"],
        },
        max_new_tokens=4,
        do_sample=False,
    )
    assert again == captions


# ----------------------------------------------------------------------------- bad combinations


@pytest.mark.parametrize(
    "vision, text, overrides, message",
    [
        # a text-only model as the tower: BERT and Llama name no image output
        (("bert", {}), None, {}, r"'bert', which is not a supported image tower\. Supported: CLIP .*SigLIP2.*ConvNeXt"),
        (("llama", {}), None, {}, r"'llama', which is not a supported image tower.*vision_config=None"),
        # an image tower or encoder-decoder as the language model
        (None, ("dinov2", {}), {}, r"'dinov2', which is not a causal language model.*gpt2, llama, qwen2"),
        (None, ("whisper", {}), {}, r"'whisper', an encoder-decoder model.*decoder-only causal"),
        # no pooled output: SigLIP2 without its attention-pooling head
        (("siglip2_vision_model", dict(vision_use_head=False)), None, {}, r"vision_use_head=False.*Supported towers"),
    ],
)  # fmt: skip
def test_more_bad_combinations_name_the_supported_families(vision, text, overrides, message):
    from conftest import tiny_vision_config

    vision_config = tiny_vision_config() if vision is None else AutoConfig.for_model(vision[0], **vision[1])
    text_config = tiny_text_config(300) if text is None else AutoConfig.for_model(text[0], **text[1])
    with pytest.raises(ValueError, match=message):
        ClipCapConfig(vision_config=vision_config, text_config=text_config, **overrides)


def test_train_py_refuses_a_pooled_run_on_a_tower_without_pooled_output(tmp_path, setup):
    """The flag reaches the config check: SigLIP without its head trains only with --mapping_input tokens."""
    import train
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(
        SiglipVisionConfig(**VIT, image_size=32, patch_size=8, vision_use_head=False)
    ).save_pretrained(tmp_path / "headless")
    argv = ["--vision_model_name_or_path", str(tmp_path / "headless"), "--text_model_name_or_path",
            str(setup / "llama"), "--train_file", str(setup / "data"), "--output_dir", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(ValueError, match=r"vision_use_head=False.*mapping_input='tokens'"):
        train.main(argv)
    args = train.parse_args([*argv, "--mapping_input", "tokens", "--mapping_type", "transformer"])
    model, _ = train.build_model_and_processor(args)
    assert model.config.mapping_input == "tokens" and model.config.image_embed_dim == 32


def test_siglip2_through_the_pipeline_and_the_app_keeps_the_mask_and_shapes(tmp_path):
    """The pipeline and the web app give a SigLIP2 tower its pixel_attention_mask and spatial_shapes: their
    captions and prefix tokens equal those of the processor's full output, and a dropped mask changes the
    prefix."""
    from transformers import Siglip2ImageProcessorPil, pipeline

    from modeling_clipcap.app import caption_pil_images

    tokenizer = build_tiny_tokenizer()
    tower = AutoConfig.for_model("siglip2_vision_model", **VIT, num_patches=16, patch_size=8)
    config = ClipCapConfig(vision_config=tower, text_config=tiny_text_config(len(tokenizer)), prefix_length=3)
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config).eval()
    processor = ClipCapProcessor(Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16), tokenizer)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (20, 60), (20, 20, 200))]
    full = processor(images=images, return_tensors="pt")
    expected = [" ".join(t.split()) for t in processor.batch_decode(model.generate(**full, max_new_tokens=4))]
    assert expected[0] != expected[1]  # the two images' captions differ: a swap would fail

    captioner = pipeline("image-captioning", model=str(tmp_path / "m"))
    outs = captioner(images, max_new_tokens=4)
    got = [(o[0] if isinstance(o, list) else o)["generated_text"] for o in outs]
    assert got == expected

    captions, prefix_tokens = caption_pil_images(model, processor, images, {"max_new_tokens": 4})
    assert [c[0] for c in captions] == expected
    assert prefix_tokens == model.interpret_prefix(**full, tokenizer=tokenizer)
    with torch.no_grad():
        masked = model.get_prefix(**full)[0]
        unmasked = model.get_prefix(
            pixel_values=full["pixel_values"], spatial_shapes=full["spatial_shapes"],
            pixel_attention_mask=torch.ones_like(full["pixel_attention_mask"]),
        )[0]  # fmt: skip
    assert not torch.allclose(masked, unmasked)
