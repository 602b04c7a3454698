"""Who is where: the rule-based caption rewrites (hard negatives, mirroring), hard negatives in the contrastive
loss, relation-aware flips in tower pretraining, and the ARO-style binding score."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch

from modeling_clipcap.caption_rewrites import (
    binding_scores,
    change_attribute,
    check_negative_kinds,
    hard_negatives,
    mirror_caption,
    swap_attributes,
    swap_objects,
    swap_relation,
)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------- the rewrites


@pytest.mark.parametrize(
    ("caption", "want"),
    [
        ("a black dog chasing a white cat.", "a white dog chasing a black cat."),
        (
            "A man in a red shirt standing to the left of a woman in a blue dress.",
            "A man in a blue shirt standing to the left of a woman in a red dress.",
        ),
        ("an orange cat on top of a wooden table", "a wooden cat on top of an orange table"),
        (
            "a small red circle left of a large blue square.",
            "a large blue circle left of a small red square.",
        ),
    ],
)
def test_swap_attributes_swaps_the_attribute_words_and_fixes_the_article(caption, want):
    assert swap_attributes(caption) == want
    # only the attribute words moved: the same words, in other places
    assert sorted(want.lower().replace("an ", "a ").split()) == sorted(
        caption.lower().replace("an ", "a ").split()
    )


@pytest.mark.parametrize(
    ("caption", "want"),
    [
        (
            "The small red circle is above the large blue square.",
            "The large blue square is above the small red circle.",
        ),
        (
            "A man in a red shirt standing to the left of a woman in a blue dress.",
            "A woman in a red shirt standing to the left of a man in a blue dress.",
        ),
        (
            "a picture of a large blue triangle below a small green circle.",
            "a picture of a small green circle below a large blue triangle.",
        ),
        ("a dog in front of an old car", "an old car in front of a dog"),
    ],
)
def test_swap_objects_swaps_subject_and_object_of_the_relation(caption, want):
    assert swap_objects(caption) == want


@pytest.mark.parametrize(
    ("caption", "want"),
    [
        (
            "a small red square left of a large blue circle.",
            "a small red square right of a large blue circle.",
        ),
        ("a cup to the right of a plate", "a cup to the left of a plate"),
        ("The lamp is above the table.", "The lamp is below the table."),
        ("a dog in front of an old car", "a dog behind an old car"),
    ],
)
def test_swap_relation_inverts_the_relation(caption, want):
    assert swap_relation(caption) == want


@pytest.mark.parametrize(
    "caption",
    [
        "a cat next to a dog",  # symmetric: swapping the objects or the relation means the same
        "a purple triangle that is small.",  # one phrase; the attribute after the noun is not parsed
        "red circles and blue squares",  # no determiners
        "a stop sign to the left of a red car",  # compound noun: refused rather than split
        "a red circle left of a red circle",  # the swap would change nothing
        "a dog left of a cat above a bird",  # two relations
    ],
)
def test_what_cannot_be_parsed_is_refused(caption):
    assert swap_objects(caption) is None
    assert swap_attributes(caption) is None
    if "next to" in caption or "above a bird" in caption:
        assert swap_relation(caption) is None


def test_change_attribute_stays_within_the_kind_and_the_vocabulary():
    rng = random.Random(0)
    for _ in range(20):
        changed = change_attribute(
            "a small red circle.", rng, vocabulary={"red", "blue", "green", "small", "large"}
        )
        assert changed in {"a large red circle.", "a small blue circle.", "a small green circle."}
    assert change_attribute("a circle.", rng) is None
    assert change_attribute("a red circle.", rng, vocabulary={"red"}) is None  # no other colour allowed


def test_hard_negatives_are_distinct_and_never_the_caption():
    caption = "a small red square left of a large blue circle."
    negatives = hard_negatives(caption, rng=random.Random(0))
    assert len(negatives) == 4 and len(set(negatives)) == 4 and caption not in negatives
    assert hard_negatives("a cat next to a dog") == []
    with pytest.raises(ValueError, match="swap_colours"):
        check_negative_kinds(["swap_colours"])


@pytest.mark.parametrize(
    ("caption", "axis", "want"),
    [
        (
            "a small red square left of a large blue circle.",
            "horizontal",
            "a small red square right of a large blue circle.",
        ),
        (
            "a dog on the left side of the road, trees to the right",
            "horizontal",
            "a dog on the right side of the road, trees to the left",
        ),
        (
            "a small red square above a large blue circle.",
            "vertical",
            "a small red square below a large blue circle.",
        ),
        ("a red kite above a blue balloon", "horizontal", "a red kite above a blue balloon"),  # unchanged
        ("a cup left of a plate", "vertical", "a cup left of a plate"),
    ],
)
def test_mirror_caption(caption, axis, want):
    assert mirror_caption(caption, axis) == want


@pytest.mark.parametrize(
    ("caption", "axis"),
    [
        ("a stop sign left of a car", "horizontal"),  # the text on the sign would read backwards
        ("the car turned right at the corner", "horizontal"),  # "right" is not a side here
        ("a man raising his left hand", "horizontal"),
        ("a cat sitting on a mat", "vertical"),  # gravity
        ("birds in the sky above a lake", "vertical"),
    ],
)
def test_mirror_caption_refuses_what_it_cannot_rewrite_safely(caption, axis):
    assert mirror_caption(caption, axis) is None


# ------------------------------------------------------------------------------------ the ARO-style score


def test_binding_score_of_a_tower_blind_to_word_order_is_one_half():
    """A text encoder that sums word vectors gives a caption and its order-only rewrites the same embedding."""
    words: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def bag_of_words(texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            vectors = [
                words.setdefault(w, torch.randn(8, generator=gen))
                for w in sorted(t.lower().strip(".").split())
            ]  # summed in a fixed order: the embedding depends on the bag of words only, bit for bit
            out.append(torch.nn.functional.normalize(torch.stack(vectors).sum(0), dim=0))
        return torch.stack(out)

    captions = [
        "a small red square left of a large blue circle.",
        "a large green triangle above a small yellow square.",
        "a blue circle right of a red triangle.",
    ]
    images = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
    scores = binding_scores(images, captions, bag_of_words)
    assert scores["swap_attributes"] == 0.5 and scores["swap_objects"] == 0.5 and scores["aro"] == 0.5
    assert scores["swap_attributes pairs"] == 3 and scores["swap_relation pairs"] == 3

    # an encoder that reads word order (the image embeddings are the true captions' own): every swap loses
    def ordered(texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(
            torch.stack(
                [
                    torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                    for t in texts
                ]
            ),
            dim=1,
        )

    perfect = binding_scores(ordered(captions), captions, ordered)
    assert perfect["aro"] == 1.0 and perfect["swap_relation"] == 1.0


# ------------------------------------------------------------------------------- pretraining with negatives


def _load_pretrain_clip():
    spec = importlib.util.spec_from_file_location(
        "pretrain_clip_binding", REPO / "training" / "pretrain_clip.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_clip_binding"] = module
    spec.loader.exec_module(module)
    return module


pc = _load_pretrain_clip()


def test_hard_negatives_join_the_image_side_of_the_loss_by_hand():
    """One image, its caption and two hard negatives: the negatives are the only competitors, so the loss is
    half the image's cross-entropy over its three columns (the caption's own side has a single image)."""
    i2t = torch.tensor([[3.0, 1.0, 2.5]])
    want = -(3.0 - torch.logsumexp(torch.tensor([3.0, 1.0, 2.5]), 0)) / 2
    assert math.isclose(pc.contrastive_loss(i2t, i2t).item(), want.item(), rel_tol=1e-6)
    # two images, one negative: the negative's column joins both images' rows, never the text side
    i2t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 3.0, 2.0]])
    t2i = torch.tensor([[1.0, 0.5, 9.0], [0.0, 2.0, 9.0]])

    def ce(row, target):
        return -(row[target] - torch.logsumexp(row, 0))

    image_side = (ce(i2t[0], 0) + ce(i2t[1], 1)) / 2
    text_side = (ce(t2i[:, 0], 0) + ce(t2i[:, 1], 1)) / 2
    assert math.isclose(
        pc.contrastive_loss(i2t, t2i).item(), ((image_side + text_side) / 2).item(), rel_tol=1e-6
    )


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """Ten 32x32 images of two coloured squares with template captions, and a tiny tokenizer."""
    from conftest import build_tiny_tokenizer
    from PIL import Image

    root = tmp_path_factory.mktemp("binding")
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
    names = list(colours)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(10):
            a, b = names[i % 3], names[(i + 1) % 3]
            image = Image.new("RGB", (32, 32), (255, 255, 255))
            image.paste(colours[a], (2, 12, 12, 22))
            image.paste(colours[b], (20, 12, 30, 22))
            image.save(root / f"{i}.png")
            caption = f"a {'small' if i % 2 else 'large'} {a} square left of a large {b} circle."
            f.write(json.dumps({"file_name": f"{i}.png", "captions": [caption]}) + "\n")
    build_tiny_tokenizer(root / "tokenizer")
    return root


def _pretrain(folder: Path, out: Path, **kwargs):
    return pc.pretrain_tower(
        folder / "metadata.jsonl",
        out,
        vision_config=dict(
            model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        ),
        tokenizer_name=folder / "tokenizer",
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
        image_size=32,
        learning_rate=1e-3,
        weight_decay=0.0,
        warmup_steps=1,
        max_steps=4,
        seed=0,
        show_progress=False,
        **kwargs,
    )


def test_with_batch_size_one_only_hard_negatives_give_a_loss(shapes_folder, tmp_path):
    plain = _pretrain(shapes_folder, tmp_path / "plain", batch_size=1)
    negatives = _pretrain(
        shapes_folder,
        tmp_path / "neg",
        batch_size=1,
        hard_negatives=["swap_attributes", "swap_relation"],
        negatives_per_caption=2,
    )
    assert (
        plain["first_loss"] == 0.0 and plain["final_loss"] == 0.0
    )  # one image, one caption: nothing to contrast
    assert negatives["first_loss"] > 0.1, negatives
    assert negatives["hard_negatives"] == ["swap_attributes", "swap_relation"]


def test_flips_and_binding_scores_in_pretraining(shapes_folder, tmp_path):
    summary = _pretrain(
        shapes_folder,
        tmp_path / "flip",
        batch_size=4,
        flip=["horizontal"],
        hard_negatives=["swap_objects"],
        eval_file=shapes_folder / "metadata.jsonl",
    )
    binding = summary["binding"]
    assert summary["flip"] == ["horizontal"] and binding["images"] == 10
    assert binding["swap_objects pairs"] == 10 and 0.0 <= binding["aro"] <= 1.0
    views, _ = pc.caption_views([["a red square left of a blue circle.", "a stop sign."]], ("horizontal",))
    assert views == [[["a red square left of a blue circle.", "a stop sign."], []]]  # a sign: never flipped
    with pytest.raises(ValueError, match="negatives_per_caption"):
        _pretrain(
            shapes_folder,
            tmp_path / "bad",
            batch_size=2,
            hard_negatives=["swap_objects"],
            negatives_per_caption=0,
        )
    with pytest.raises(ValueError, match="swap_colour"):
        _pretrain(shapes_folder, tmp_path / "bad", batch_size=2, hard_negatives=["swap_colour"])


def test_flip_pixels_mirrors_the_right_axis():
    x = torch.arange(2 * 3 * 2 * 3).reshape(2, 3, 2, 3)
    assert torch.equal(pc.flip_pixels(x, "horizontal")[..., 0], x[..., 2])
    assert torch.equal(pc.flip_pixels(x, "vertical")[:, :, 0], x[:, :, 1])


# ------------------------------------------------------------------------- token positions in the mapper


def _tokens_model(tokenizer, **overrides):
    from conftest import tiny_clipcap_config

    from modeling_clipcap import ClipCapForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_clipcap_config(len(tokenizer), "transformer", mapping_input="tokens", **overrides)
    return ClipCapForConditionalGeneration(config).eval()


def test_token_positions_make_the_mapper_see_where_each_token_is(tiny_tokenizer, tmp_path):
    from transformers import AutoModel

    plain = _tokens_model(tiny_tokenizer)
    positioned = _tokens_model(tiny_tokenizer, mapping_num_tokens=17)  # 4x4 patches + the class token
    tokens = torch.randn(2, 17, plain.config.image_embed_dim, generator=torch.Generator().manual_seed(0))
    swapped = tokens[:, [0, *range(16, 0, -1)]]  # the patches in mirrored order
    with torch.no_grad():
        # attention alone is blind to the order of its inputs: without positions the prefix does not change
        torch.testing.assert_close(
            plain.get_prefix(image_embeds=swapped)[0], plain.get_prefix(image_embeds=tokens)[0]
        )
        assert not torch.allclose(
            positioned.get_prefix(image_embeds=swapped)[0], positioned.get_prefix(image_embeds=tokens)[0]
        )
        with pytest.raises(ValueError, match="mapping_num_tokens=17"):
            positioned.get_prefix(image_embeds=tokens[:, :16])
    assert positioned.model.mapping_network.token_positions.std() > 0  # initialised, not left at zero

    # saved and loaded: the same positions, the same captions; batched == one at a time
    positioned.save_pretrained(tmp_path / "model")
    loaded = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert torch.equal(
        loaded.model.mapping_network.token_positions, positioned.model.mapping_network.token_positions
    )
    kwargs = dict(max_new_tokens=5, do_sample=False)
    batched = loaded.generate(image_embeds=tokens, **kwargs)
    assert torch.equal(batched, positioned.generate(image_embeds=tokens, **kwargs))
    for i in range(2):
        single = loaded.generate(image_embeds=tokens[i : i + 1], **kwargs)
        assert torch.equal(single[0], batched[i, : single.shape[1]])


def test_token_positions_need_the_token_input(tiny_tokenizer):
    from conftest import tiny_clipcap_config

    with pytest.raises(ValueError, match="needs mapping_input='tokens'"):
        tiny_clipcap_config(len(tiny_tokenizer), "transformer", mapping_num_tokens=17)
    with pytest.raises(ValueError, match="positive integer"):
        tiny_clipcap_config(len(tiny_tokenizer), "transformer", mapping_input="tokens", mapping_num_tokens=0)
