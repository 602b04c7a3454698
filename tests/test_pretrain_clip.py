"""Tests for training/pretrain_clip.py: contrastive pretraining (CLIP and FILIP) of any supported image tower.

FILIP's similarity is checked against explicit loops on fixed tensors, padding (caption tokens, SigLIP2's empty
patch slots) is shown not to matter, and for every supported tower family (``towers.VISION_FAMILIES``, SigLIP2's
patches with their mask included) x objective a few steps on a tiny image folder move the tower and lower the loss,
and the saved tower loads into ClipCap (``from_vision_text_pretrained``) with exactly its trained weights and
outputs, which differ from those of the tower it started from.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, build_tiny_tokenizer, tiny_text_config

from modeling_clipcap.towers import VISION_FAMILIES, image_features

REPO = Path(__file__).resolve().parents[1]


def _load_module():
    spec = importlib.util.spec_from_file_location("pretrain_clip", REPO / "training" / "pretrain_clip.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_clip"] = module
    spec.loader.exec_module(module)
    return module


pc = _load_module()

_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
_CNN = dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=4)
TINY_TOWERS = {
    "clip_vision_model": dict(
        model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=16, **_VIT
    ),
    "siglip_vision_model": dict(model_type="siglip_vision_model", image_size=32, patch_size=8, **_VIT),
    # NaFlex: up to 16 patches of 8x8 pixels (a 32x32 image), read with pixel_attention_mask and spatial_shapes
    "siglip2_vision_model": dict(model_type="siglip2_vision_model", num_patches=16, patch_size=8, **_VIT),
    "dinov2": dict(
        model_type="dinov2",
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
    ),
    "vit": dict(model_type="vit", image_size=32, patch_size=8, **_VIT),
    "convnext": dict(model_type="convnext", **_CNN),
    "convnextv2": dict(model_type="convnextv2", **_CNN),
    "resnet": dict(
        model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    ),
}
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


# ------------------------------------------------------------------------------------------ FILIP by hand


def _filip_by_loops(image_tokens, text_tokens, lengths):
    """FILIP's two similarities with plain Python loops over (image, caption, token) triples."""
    n_img, n_txt = image_tokens.shape[0], text_tokens.shape[0]
    i2t = torch.zeros(n_img, n_txt)
    t2i = torch.zeros(n_img, n_txt)
    for i in range(n_img):
        for j in range(n_txt):
            patches = [image_tokens[i, k] for k in range(image_tokens.shape[1])]
            words = [text_tokens[j, r] for r in range(lengths[j])]
            dots = [[float(p @ w) for w in words] for p in patches]
            i2t[i, j] = sum(max(row) for row in dots) / len(patches)
            t2i[i, j] = sum(max(dots[k][r] for k in range(len(patches))) for r in range(len(words))) / len(
                words
            )
    return i2t, t2i


def test_filip_similarity_equals_a_hand_checked_example():
    # one image with two tokens, two captions; caption 1 has a padded last token
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    i2t, t2i = pc.filip_similarity(image, text, mask)
    # image->caption 0: patch (1,0) best 1.0, patch (0,1) best 0.8 -> 0.9; caption 0->image: word (1,0) best 1.0,
    # word (.6,.8) best 0.8 -> 0.9. Caption 1 (its padding (9,9) ignored): patches 0.0 and 1.0 -> 0.5; its one
    # word (0,1) best 1.0 -> 1.0.
    assert torch.allclose(i2t, torch.tensor([[0.9, 0.5]]))
    assert torch.allclose(t2i, torch.tensor([[0.9, 1.0]]))


def test_filip_similarity_equals_explicit_loops_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(3, 5, 4, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 6, 4, generator=g), dim=-1)
    lengths = [6, 2, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    i2t, t2i = pc.filip_similarity(image, text, mask)
    want_i2t, want_t2i = _filip_by_loops(image, text, lengths)
    assert torch.allclose(i2t, want_i2t, atol=1e-6)
    assert torch.allclose(t2i, want_t2i, atol=1e-6)
    assert not torch.allclose(i2t, t2i)  # the two directions are different similarities


def test_filip_padding_tokens_do_not_change_the_similarity():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    before = pc.filip_similarity(image, text, mask)
    changed = text.clone()
    changed[mask == 0] = 100.0  # padding that would win every max if it were looked at
    after = pc.filip_similarity(image, changed, mask)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    unmasked = pc.filip_similarity(image, changed, torch.ones_like(mask))
    assert not torch.allclose(before[0], unmasked[0])  # the test can see padding when it is not masked


def test_filip_padded_image_tokens_are_neither_matched_nor_averaged():
    """SigLIP2's empty patch slots: whatever their embeddings, they change neither similarity; and the result
    equals the loops over the real image tokens alone."""
    g = torch.Generator().manual_seed(2)
    image = torch.nn.functional.normalize(torch.randn(2, 5, 4, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4, 4, generator=g), dim=-1)
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    image_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # image 1 fills 3 of its 5 slots
    before = pc.filip_similarity(image, text, text_mask, image_mask)
    changed = image.clone()
    changed[image_mask == 0] = 100.0  # padding that would win every max if it were looked at
    after = pc.filip_similarity(changed, text, text_mask, image_mask)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    want_i2t, want_t2i = _filip_by_loops(image[1:, :3], text, [4, 2, 1])
    assert torch.allclose(before[0][1:], want_i2t, atol=1e-6) and torch.allclose(
        before[1][1:], want_t2i, atol=1e-6
    )
    unmasked = pc.filip_similarity(changed, text, text_mask)
    assert not torch.allclose(before[0], unmasked[0])  # the test can see padding when it is not masked
    with pytest.raises(ValueError, match="every image needs at least one real"):
        pc.filip_similarity(image, text, text_mask, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))


def test_filip_padding_ids_do_not_change_the_model_logits():
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    text_config = CLIPTextConfig(vocab_size=50, eos_token_id=3, bos_token_id=2, pad_token_id=3, **TINY_TEXT)
    model = pc.ContrastiveDualEncoder(
        pc.tower_config(TINY_TOWERS["resnet"]), text_config, projection_dim=8, objective="filip"
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[2, 10, 11, 3, 3, 3], [2, 12, 3, 3, 3, 3]])
    mask = pc.text_attention_mask(ids, 3)
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    other = ids.clone()
    other[mask == 0] = torch.tensor([40, 41, 42, 43, 44])  # different tokens where the padding is
    with torch.no_grad():
        a = model(pixels, ids, mask)
        b = model(pixels, other, pc.text_attention_mask(ids, 3))
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)


def test_contrastive_loss_is_the_symmetric_cross_entropy():
    logits_i2t = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    logits_t2i = torch.tensor([[1.0, 0.5], [0.0, 2.0]])

    def ce(row, target):
        return -(row[target] - torch.logsumexp(row, 0))

    image_side = (ce(logits_i2t[0], 0) + ce(logits_i2t[1], 1)) / 2
    text_side = (ce(logits_t2i[:, 0], 0) + ce(logits_t2i[:, 1], 1)) / 2  # caption j's row is column j
    want = (image_side + text_side) / 2
    assert math.isclose(pc.contrastive_loss(logits_i2t, logits_t2i).item(), want.item(), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """8 coloured 32x32 images with captions, a tiny tokenizer and a tiny GPT-2."""
    from PIL import Image
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("pretrain")
    images = root / "images"
    images.mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (0, 0, 0)]
    with open(images / "metadata.jsonl", "w") as f:
        for i, colour in enumerate([*colours, (128, 128, 128)]):
            image = Image.new("RGB", (32, 32), colour)
            image.paste((255, 255, 255), (4 * i % 24, 4, 4 * i % 24 + 8, 12))
            image.save(images / f"{i}.png")
            f.write(
                json.dumps({"file_name": f"{i}.png", "captions": [TINY_CORPUS[i], TINY_CORPUS[i].upper()]})
                + "\n"
            )
    tok = build_tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_text_config(len(tok))).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root


def test_every_supported_tower_family_is_pretrained():
    assert set(TINY_TOWERS) == set(VISION_FAMILIES)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _untrained_tower(tiny_folder, family: str, objective: str, seed: int = 0):
    """The tower ``pretrain_tower(seed=seed)`` starts from: the same seed builds the same dual encoder."""
    torch.manual_seed(seed)
    _, text_cfg, _ = pc.build_text_side(tiny_folder / "tokenizer", [["a"]], TINY_TEXT)
    torch.manual_seed(seed)
    return pc.ContrastiveDualEncoder(
        pc.tower_config(TINY_TOWERS[family]), text_cfg, 16, objective
    ).vision.eval()


@pytest.mark.parametrize("objective", pc.OBJECTIVES)
@pytest.mark.parametrize("family", sorted(TINY_TOWERS))
def test_pretraining_moves_the_tower_lowers_the_loss_and_the_tower_loads_into_clipcap(
    tiny_folder, family, objective
):
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor

    from modeling_clipcap import ClipCapForConditionalGeneration

    out = tiny_folder / f"{family}_{objective}"
    summary = pc.pretrain_tower(
        tiny_folder / "images" / "metadata.jsonl",
        out,
        vision_config=TINY_TOWERS[family],
        tokenizer_name=tiny_folder / "tokenizer",
        text_config=TINY_TEXT,
        objective=objective,
        projection_dim=16,
        image_size=32,
        batch_size=8,
        learning_rate=3e-3,
        weight_decay=0.0,
        warmup_steps=2,
        max_steps=24,
        seed=0,
        show_progress=False,
    )
    assert summary["steps"] == 24 and summary["tower"] == family and summary["objective"] == objective
    assert summary["final_loss"] < summary["first_loss"] - 0.1, summary  # means of the first / last 6 steps

    # the trained tower as transformers itself loads the folder, and the tower training started from: training
    # moved most of its tensors (not all: e.g. FILIP reads SigLIP's tokens, so its pooling head gets no gradient)
    config = pc.tower_config(TINY_TOWERS[family])
    initial = _untrained_tower(tiny_folder, family, objective)
    trained = type(initial).from_pretrained(out, **({"add_pooling_layer": False} if family == "vit" else {}))
    trained.eval()
    start, end = initial.state_dict(), trained.state_dict()
    assert set(start) == set(end)
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, end[k])]
    assert len(moved) >= len(start) // 2, f"only {len(moved)} of {len(start)} tower tensors moved"

    # ClipCap's own loading gives exactly the trained tower: its weights, and its embeddings of the images through
    # the saved image processor (SigLIP2: patches, mask and shapes), which differ from the untrained tower's
    tokens = objective == "filip"
    mapping = dict(
        mapping_input="tokens", mapping_type="transformer", mapping_num_layers=1, mapping_num_heads=4
    )
    mapping = mapping if tokens else dict(mapping_input="pooled", mapping_type="mlp")
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        str(out), str(tiny_folder / "gpt2"), prefix_length=2, **mapping
    ).eval()
    # every saved tensor is in the loaded tower, one for one (matched by value: newer transformers may name
    # ViT / DINOv2 parameters differently from the files they write)
    saved = list(load_file(out / "model.safetensors").values())  # the trained weights as written
    loaded = list(model.vision_model.state_dict().values())
    assert len(loaded) == len(saved)
    unmatched = list(loaded)
    for tensor in saved:
        match = next((i for i, candidate in enumerate(unmatched) if _same(candidate, tensor)), None)
        assert match is not None, f"a saved tensor of shape {tuple(tensor.shape)} is not in the loaded tower"
        unmatched.pop(match)
    processor = AutoImageProcessor.from_pretrained(out)
    images = [Image.open(tiny_folder / "images" / f"{i}.png") for i in range(8)]
    inputs = dict(processor(images, return_tensors="pt"))
    if family == "siglip2_vision_model":
        assert set(inputs) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
        assert (
            inputs["pixel_values"].shape == (8, 16, 3 * 8 * 8)
            and inputs["spatial_shapes"].tolist() == [[4, 4]] * 8
        )
    else:
        assert inputs["pixel_values"].shape == (8, 3, 32, 32)
    with torch.no_grad():
        _, got = model.get_prefix(**inputs)  # what the mapper reads: pooled (B, D) or tokens (B, N, D)

        def embedding(tower):
            features = image_features(tower, config, **inputs)
            return features.last_hidden_state if tokens else features.pooler_output

        torch.testing.assert_close(got, embedding(trained))
        assert not torch.allclose(got, embedding(initial), atol=1e-4)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[0] == 8


def test_unsupported_tower_and_objective_get_clear_errors(tiny_folder):
    with pytest.raises(ValueError, match="not a supported image tower"):
        pc.tower_config({"model_type": "gpt2"})
    from transformers import CLIPTextConfig

    with pytest.raises(ValueError, match="objective must be one of"):
        pc.ContrastiveDualEncoder(
            pc.tower_config(TINY_TOWERS["resnet"]), CLIPTextConfig(**TINY_TEXT), 8, objective="siglip"
        )


def test_command_line_reads_the_preset_and_a_tower_file(tiny_folder, tmp_path, capsys):
    tower_file = tmp_path / "tower.json"
    tower_file.write_text(json.dumps(TINY_TOWERS["convnext"]))
    status = pc.main(
        [
            "--train_file", str(tiny_folder / "images"),
            "--tokenizer_name", str(tiny_folder / "tokenizer"),
            "--output_dir", str(tmp_path / "out"),
            "--config", "clipcap-synthetic-tiny",
            "--vision_config", str(tower_file),
            "--objective", "filip",
            "--image_size", "32",
            "--batch_size", "4",
            "--max_steps", "2",
            "--no_progress",
        ]
    )  # fmt: skip
    assert status == 0
    summary = json.loads((tmp_path / "out" / "pretrain_results.json").read_text())
    assert (summary["tower"], summary["objective"], summary["steps"], summary["batch_size"]) == (
        "convnext",
        "filip",
        2,
        4,
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "convnext"
    assert (
        pc.main(["--train_file", str(tiny_folder / "images"), "--tokenizer_name", "x", "--output_dir", "y"])
        == 2
    )
    assert "no vision tower config" in capsys.readouterr().err
