"""Learning from text (issue 25): caption datastores, retrieval-augmented ClipCap, text-only training.

Tiny towers (a 32x32 CLIP vision tower and a 1-layer CLIP text tower) and a tiny GPT-2, built here."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_processor, tiny_clipcap_config, tiny_vision_config
from PIL import Image

CAPTIONS = [
    "a red circle.",
    "a blue square.",
    "a green triangle.",
    "a small dog on the grass.",
    "two cats on a sofa.",
    "a man riding a horse.",
    "a plate of food.",
    "a red car on a street.",
]


def build_tiny_towers(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A dual-encoder folder in the layout training/pretrain_clip.py writes (the tower, text_tower/,
    dual_encoder.json); the CLIP ViT's image_embeds are already projected, so no image_projection file."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(tiny_vision_config()).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"bos_token": "<|startoftext|>"})
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=40,
        projection_dim=24,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    CLIPTextModelWithProjection(config).save_pretrained(folder / "text_tower")
    tok.save_pretrained(folder / "text_tower")
    (folder / "dual_encoder.json").write_text(
        json.dumps({"text_tower": "text_tower", "image_projection": None})
    )
    return folder


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def write_lm_corpus_and_pairs(
    tmp_path: Path, tokenizer, corpus_repeat: int, image_seed: int = 0, two_captions: bool = False
) -> tuple[Path, Path, Path]:
    """Text training's inputs: a tiny random GPT-2 saved with ``tokenizer`` (``lm/``), ``corpus.txt`` (CAPTIONS x
    ``corpus_repeat``) and 4 paired images (``pics/metadata.jsonl``; with ``two_captions`` each also has its
    caption upper-cased). Returns the three paths."""
    from conftest import tiny_text_config
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_text_config(len(tokenizer))).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS * corpus_repeat) + "\n")
    pics = tmp_path / "pics"
    pics.mkdir()
    with open(pics / "metadata.jsonl", "w") as f:
        for i, (pic, caption) in enumerate(zip(images(4, seed=image_seed), CAPTIONS)):
            pic.save(pics / f"{i}.png")
            captions = [caption, caption.upper()] if two_captions else [caption]
            f.write(json.dumps({"file_name": f"{i}.png", "captions": captions}) + "\n")
    return tmp_path / "lm", corpus, pics / "metadata.jsonl"


def fresh_model(towers_dir: Path, lm: Path):
    """What text training starts from (seed 0): ``towers_dir``'s image tower, the ``lm``, a 2-token MLP mapper."""
    from modeling_clipcap import ClipCapForConditionalGeneration

    torch.manual_seed(0)
    return ClipCapForConditionalGeneration.from_vision_text_pretrained(
        str(towers_dir), str(lm), mapping_type="mlp", prefix_length=2, normalize_prefix=True
    )


def moved(trained: torch.nn.Module, start: torch.nn.Module) -> list[bool]:
    """Per parameter: does ``trained`` differ from ``start``?"""
    return [not torch.allclose(a, b) for a, b in zip(trained.parameters(), start.parameters())]


@pytest.fixture(scope="module")
def towers_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_tiny_towers(tmp_path_factory.mktemp("towers"), tiny_tokenizer)


@pytest.fixture(scope="module")
def datastore_dir(tmp_path_factory, towers_dir) -> Path:
    from modeling_clipcap.cli import main

    folder = tmp_path_factory.mktemp("store")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS) + "\n")
    assert main(["index", "--model", str(towers_dir), "--data", str(corpus), "--output_dir", str(folder / "ds"),
                 "--no_progress"]) == 0  # fmt: skip
    return folder / "ds"


def test_index_round_trips_and_matches_brute_force(datastore_dir, towers_dir):
    """clipcap index writes the captions with their text embeddings (Parquet) and an exact faiss index: its
    neighbours are brute force's, and the stored embeddings are the towers' own."""
    import pyarrow.parquet as pq

    from modeling_clipcap.retrieval import Datastore, load_towers

    towers = load_towers(towers_dir)
    store = Datastore.load(datastore_dir, towers=towers)
    table = pq.read_table(datastore_dir / "captions.parquet")
    assert table["caption"].to_pylist() == CAPTIONS
    stored = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(stored, towers.encode_texts(CAPTIONS), atol=1e-5)
    queries = towers.encode_images(images(5))
    found = store.search(queries, 3)
    brute = np.argsort(-(queries @ stored.T), axis=1)[:, :3]
    assert found == [[CAPTIONS[i] for i in row] for row in brute]
    assert store.retrieve(images(5), 3) == found  # the processor's entry point: images in, captions out


def test_the_same_towers_by_another_path_are_accepted(datastore_dir, towers_dir, monkeypatch):
    """The fingerprint is of what the towers compute, not of the path they were loaded by: the towers named by a
    relative path (as `clipcap index --model demo_output/clip` records them) match those named absolutely (as
    train.py's --vision_model_name_or_path may give them)."""
    from modeling_clipcap.retrieval import Datastore, load_towers

    monkeypatch.chdir(towers_dir.parent)
    relative = load_towers(towers_dir.name)
    absolute = load_towers(towers_dir.resolve())
    assert relative.fingerprint("text") == absolute.fingerprint("text")
    assert relative.fingerprint("image") == absolute.fingerprint("image")
    Datastore.load(datastore_dir, towers=relative)  # built from the absolute path: accepted


def test_bad_datastores_get_clear_errors(tmp_path, datastore_dir, towers_dir, tiny_tokenizer):
    from modeling_clipcap.cli import main
    from modeling_clipcap.retrieval import Datastore, DatastoreError, load_towers

    other = load_towers(build_tiny_towers(tmp_path / "other", tiny_tokenizer, seed=1))
    with pytest.raises(DatastoreError, match="was built with the text tower of .*Rebuild the datastore"):
        Datastore.load(datastore_dir, towers=other)
    with pytest.raises(DatastoreError, match=r"k=9 is larger than the datastore .*\(8 captions\)"):
        Datastore.load(datastore_dir).search(np.zeros((1, 24), np.float32), 9)
    with pytest.raises(DatastoreError, match="not a datastore"):
        Datastore.load(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["index", "--model", str(towers_dir), "--data", str(empty), "--output_dir", str(tmp_path / "e"),
                 "--no_progress"]) == 2  # fmt: skip
    # a store whose record says it is empty (e.g. written by hand) is refused when loaded
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "datastore.json").write_text(json.dumps({"format": 1, "size": 0}))
    with pytest.raises(DatastoreError, match="is empty"):
        Datastore.load(tmp_path / "e")


def test_training_retrieval_leaves_out_the_images_own_captions(tmp_path, towers_dir):
    """An image datastore of captioned images: without the exclusion each image's nearest captions are its own
    (identical embeddings); training's retrieval never returns them."""
    from modeling_clipcap.retrieval import build_datastore, load_towers, retrieve_for_training

    towers = load_towers(towers_dir)
    pics = images(4)
    keys = [f"img{i}" for i in range(4) for _ in range(2)]
    captions = [f"{c} number {i}" for i in range(4) for c in ("a photo", "a picture")]
    store = build_datastore(towers, captions, tmp_path / "ds", keys=keys, images=[pics[int(k[3])] for k in keys],
                            modality="image", show_progress=False)  # fmt: skip
    plain = store.search(towers.encode_images(pics), 2)
    assert all(
        set(found) == {f"a photo number {i}", f"a picture number {i}"} for i, found in enumerate(plain)
    )
    prompts, retrieved = retrieve_for_training(store, pics, [f"img{i}" for i in range(4)], 2, "{captions} so")
    for i, found in enumerate(retrieved):
        assert len(found) == 2 and not any(f"number {i}" in c for c in found), (i, found)
        assert prompts[i] == " ".join(found) + " so"


def test_collator_puts_the_prompt_first_and_does_not_predict_it(tiny_tokenizer):
    from modeling_clipcap.data import CaptionCollator

    collator = CaptionCollator(tiny_tokenizer, 16)
    batch = collator([{"caption": "a dog.", "prompt": "a cat. a cow.", "image_embeds": torch.zeros(3)}])
    prompt = tiny_tokenizer("a cat. a cow.", add_special_tokens=False)["input_ids"]
    caption = tiny_tokenizer("a dog.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == prompt + caption
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + caption


@pytest.fixture(scope="module")
def retrieval_model(tiny_tokenizer):
    from modeling_clipcap import ClipCapForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_clipcap_config(len(tiny_tokenizer), retrieval_k=2, retrieval_template="like {captions} so")
    return ClipCapForConditionalGeneration(config).eval()


def test_generate_with_retrieved_captions_equals_the_prompt_by_hand(retrieval_model, tiny_tokenizer):
    from modeling_clipcap.captioning import caption_items

    processor = build_tiny_processor(copy.deepcopy(tiny_tokenizer))
    pics = images(2)
    retrieved = [["a red circle.", "a dog."], ["two cats on a sofa.", "a plate of food."]]
    inputs = processor(
        images=pics, retrieved_captions=retrieved, retrieval_k=2, retrieval_template="like {captions} so"
    )
    by_hand = processor(
        images=pics, text=["like a red circle. a dog. so", "like two cats on a sofa. a plate of food. so"]
    )
    torch.testing.assert_close(inputs["input_ids"], by_hand["input_ids"])
    ids = retrieval_model.generate(**inputs, max_new_tokens=5)
    expected = retrieval_model.generate(**by_hand, max_new_tokens=5)
    assert torch.equal(ids, expected)
    captions = [c[0] for _, c, _ in caption_items(
        retrieval_model, processor,
        [{"image_id": i, "image": p, "retrieved_captions": r} for i, (p, r) in enumerate(zip(pics, retrieved))],
        max_new_tokens=5)]  # fmt: skip
    width = by_hand["input_ids"].shape[1]
    assert captions == [" ".join(t.split()) for t in processor.batch_decode(expected[:, width:])]


def test_batch_equals_one_at_a_time_with_a_datastore(retrieval_model, tiny_tokenizer, datastore_dir):
    """The processor retrieves from the datastore; prompts of different lengths are left-padded in a batch."""
    from modeling_clipcap.captioning import caption_items
    from modeling_clipcap.retrieval import Datastore

    processor = build_tiny_processor(copy.deepcopy(tiny_tokenizer))
    store = Datastore.load(datastore_dir)
    pics = images(4, seed=3)
    prompts = {len(processor.tokenizer(" ".join(r))["input_ids"]) for r in store.retrieve(pics, 2)}
    assert len(prompts) > 1, "the test needs prompts of different lengths"
    batched = [c for _, c, _ in caption_items(retrieval_model, processor, pics, batch_size=4, datastore=store,
                                              max_new_tokens=6, num_beams=2)]  # fmt: skip
    single = [c for _, c, _ in caption_items(retrieval_model, processor, pics, batch_size=1, datastore=store,
                                             max_new_tokens=6, num_beams=2)]  # fmt: skip
    assert batched == single
    with pytest.raises(ValueError, match="retrieval-augmented .*give a datastore"):
        list(caption_items(retrieval_model, processor, pics, max_new_tokens=3))


def test_a_model_without_retrieval_refuses_a_datastore(tiny_model, tiny_processor, datastore_dir):
    from modeling_clipcap.captioning import caption_items
    from modeling_clipcap.retrieval import Datastore

    assert tiny_model.config.retrieval_k == 0  # the default: off, the paper's model
    with pytest.raises(ValueError, match="not trained with retrieval"):
        list(caption_items(tiny_model, tiny_processor, images(1), datastore=Datastore.load(datastore_dir)))


def test_saved_retrieval_model_loads_with_automodel_and_remote_code(
    retrieval_model, tiny_tokenizer, tmp_path, datastore_dir, capsys
):
    from test_auto_and_remote import run_without_package
    from transformers import AutoModel, AutoProcessor

    processor = build_tiny_processor(copy.deepcopy(tiny_tokenizer))
    retrieval_model.generation_config.max_new_tokens = 5  # what clipcap caption and the pipeline decode with
    retrieval_model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert (loaded.config.retrieval_k, loaded.config.retrieval_template) == (2, "like {captions} so")
    retrieved = [["a red circle.", "a dog."]]
    inputs = AutoProcessor.from_pretrained(tmp_path / "m")(
        images=images(1), retrieved_captions=retrieved, retrieval_k=2, retrieval_template="like {captions} so"
    )
    expected = retrieval_model.generate(**inputs, max_new_tokens=5)
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=5), expected)
    images(1)[0].save(tmp_path / "pic.png")
    proc = run_without_package(
        f"""
        import json
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        path = {str(tmp_path / "m")!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        config = model.config
        inputs = processor(images=[Image.open({str(tmp_path / "pic.png")!r})], retrieved_captions={retrieved!r},
                           retrieval_k=config.retrieval_k, retrieval_template=config.retrieval_template)
        print(json.dumps(model.generate(**inputs, max_new_tokens=5).tolist()))
        """,
        cwd=tmp_path,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected.tolist()

    # clipcap caption: a retrieval model needs --datastore, and captions through it (the pipeline too)
    from transformers import pipeline

    from modeling_clipcap.captioning import caption_items
    from modeling_clipcap.cli import main
    from modeling_clipcap.retrieval import Datastore

    argv = ["caption", str(tmp_path / "pic.png"), "--model", str(tmp_path / "m"), "--no_progress", "--json"]
    assert main(argv) == 2
    assert "pass --datastore" in capsys.readouterr().err
    assert main(argv + ["--datastore", str(datastore_dir)]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["caption"]
    store = Datastore.load(datastore_dir)
    [(_, captions, _)] = caption_items(loaded, processor, [str(tmp_path / "pic.png")], datastore=store)
    assert written == captions[0]
    captioner = pipeline("image-captioning", model=str(tmp_path / "m"))
    assert captioner([str(tmp_path / "pic.png")], datastore=store) == [[{"generated_text": captions[0]}]]


def test_pretrain_clip_saves_towers_that_load_for_retrieval(tmp_path, tiny_tokenizer):
    """training/pretrain_clip.py's dual encoder (a ResNet with its own image projection) saved and read back by
    load_towers gives the same joint-space embeddings as the trained module."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import pretrain_clip
    from transformers import CLIPImageProcessorPil, CLIPTextConfig

    from modeling_clipcap.retrieval import load_towers

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"bos_token": "<|startoftext|>"})
    text_config = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=40, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)  # fmt: skip
    vision = pretrain_clip.tower_config({"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                                         "depths": [1, 1], "layer_type": "basic"})  # fmt: skip
    torch.manual_seed(0)
    model = pretrain_clip.ContrastiveDualEncoder(vision, text_config, 12, "clip").eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pretrain_clip.save_tower(model, processor, tok, tmp_path)
    towers = load_towers(tmp_path)
    pixels = processor(images(3), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.encode_image(pixels).numpy()
        ids = towers._dual_text_inputs(["a red circle.", "a dog."])
        expected_text = model.encode_text(ids["input_ids"], ids["attention_mask"]).numpy()
    np.testing.assert_allclose(towers.encode_pixels(pixels), expected, atol=1e-5)
    np.testing.assert_allclose(towers.encode_texts(["a red circle.", "a dog."]), expected_text, atol=1e-5)


def test_text_only_training_runs_and_moves_the_mapper(tmp_path, towers_dir, tiny_tokenizer):
    """train.py --text_only: no image is read for training; the mapper learns from noisy text embeddings (noise
    estimated on a paired sample), and the saved model captions images."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import train

    from modeling_clipcap import ClipCapForConditionalGeneration

    lm, corpus, pairs = write_lm_corpus_and_pairs(tmp_path, tiny_tokenizer, corpus_repeat=4)
    out = tmp_path / "out"
    summary = train.main([
        "--text_only", "--towers", str(towers_dir), "--text_model_name_or_path", str(lm),
        "--train_file", str(corpus), "--noise_sample_file", str(pairs),
        "--validation_file", str(pairs), "--output_dir", str(out), "--max_train_steps", "6",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--num_warmup_steps", "0",
        "--mapping_type", "mlp", "--prefix_length", "2", "--max_new_tokens", "4", "--no_eval_meteor",
        "--embedding_cache_dir", str(tmp_path / "cache"),
    ])  # fmt: skip
    assert summary["text_only"]["source"].startswith("estimated on") and summary["text_only"]["noise_std"] > 0
    assert summary["images_encoded_per_rank"] == [4]  # the validation images only
    model = ClipCapForConditionalGeneration.from_pretrained(out)
    assert model.config.normalize_prefix and model.config.joint_embed_dim is None  # CLIP ViT: projected
    fresh = fresh_model(towers_dir, lm)
    assert all(moved(model.model.mapping_network, fresh.model.mapping_network))
    tower = fresh.vision_model.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in model.vision_model.state_dict().items())  # frozen
    ids = model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=3)
    assert ids.shape[0] == 2


def test_image_projection_is_off_by_default_and_projects_when_set(tiny_tokenizer):
    from modeling_clipcap import ClipCapForConditionalGeneration

    plain = tiny_clipcap_config(len(tiny_tokenizer))
    assert plain.joint_embed_dim is None and plain.image_embed_dim == 24
    projected = tiny_clipcap_config(len(tiny_tokenizer), joint_embed_dim=7)
    assert projected.image_embed_dim == 7
    model = ClipCapForConditionalGeneration(projected).eval()
    pixels = torch.randn(2, 3, 32, 32)
    embeds = model.get_image_embeddings(pixels).pooler_output
    assert embeds.shape == (2, 7)
    assert not model.model.image_projection.weight.requires_grad  # frozen with the tower (freeze_vision)
    with pytest.raises(ValueError, match="retrieval_template must contain"):
        tiny_clipcap_config(len(tiny_tokenizer), retrieval_template="no slot")


def test_synthetic_text_corpus_covers_every_scene_and_the_held_out_pairs(tmp_path):
    """The unpaired corpus: every phrasing of every scene (held-out colour/shape pairs included), one caption per
    scene for a datastore, and the same scenes in a second phrasing style that no reference uses."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import synthetic_data

    paths = synthetic_data.write_text_corpus(tmp_path)
    lines = {name: path.read_text().splitlines() for name, path in paths.items()}
    assert len(lines["datastore"]) == len(lines["datastore_style2"]) == 36 + 36 * 35 * 4
    assert len(lines["captions"]) == 36 * 5 + 36 * 35 * 4 * 4
    assert "a large red triangle." in lines["captions"] and "a small green circle." in lines["datastore"]
    assert "purple square, large, above red triangle, small." in lines["datastore_style2"]
    references = {c for row in synthetic_data.generate_split("train", 50) for c in row["captions"]}
    assert references <= set(lines["captions"]) and not references & set(lines["datastore_style2"])


@pytest.mark.slow
def test_train_with_a_datastore_then_evaluate_with_another(
    tmp_path, towers_dir, datastore_dir, tiny_tokenizer
):
    """train.py --datastore: retrieval for every training and validation image (the training images' own
    captions left out), a saved model with retrieval_k, then clipcap evaluate with a different datastore."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import train
    from conftest import tiny_text_config
    from transformers import GPT2LMHeadModel

    from modeling_clipcap import ClipCapForConditionalGeneration
    from modeling_clipcap.cli import main

    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_text_config(len(tiny_tokenizer))).save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    pics = tmp_path / "pics"
    pics.mkdir()
    with open(pics / "metadata.jsonl", "w") as f:
        for i, pic in enumerate(images(6)):
            pic.save(pics / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "captions": [CAPTIONS[i], CAPTIONS[i + 1]]}) + "\n")
    paired = tmp_path / "paired_store"
    assert main(["index", "--model", str(towers_dir), "--data", str(pics / "metadata.jsonl"), "--output_dir",
                 str(paired), "--no_progress"]) == 0  # fmt: skip
    summary = train.main([
        "--vision_model_name_or_path", str(towers_dir), "--text_model_name_or_path", str(tmp_path / "lm"),
        "--train_file", str(pics / "metadata.jsonl"), "--validation_file", str(pics / "metadata.jsonl"),
        "--datastore", str(paired), "--retrieval_k", "2", "--retrieval_template", "see {captions} so",
        "--output_dir", str(tmp_path / "out"), "--max_train_steps", "3", "--per_device_train_batch_size", "4",
        "--mapping_type", "mlp", "--prefix_length", "2", "--max_new_tokens", "4", "--no_eval_meteor",
        "--embedding_cache_dir", str(tmp_path / "cache"), "--num_warmup_steps", "0",
    ])  # fmt: skip
    assert summary["datastore"] == str(paired) and summary["completed_steps"] == 3
    model = ClipCapForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert (model.config.retrieval_k, model.config.retrieval_template) == (2, "see {captions} so")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tmp_path / "out"), "--data", str(pics / "metadata.jsonl"),
                 "--datastore", str(datastore_dir), "--output_dir", str(out), "--no_meteor", "--no_progress"]) == 0  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["config"]["datastore"] == str(datastore_dir)


def test_text_rows_shift_by_the_mean_gap_and_the_estimate_matches_by_hand():
    """NoisyTextEmbeddings with a shift and no noise gives embedding + shift; estimate_noise_std's shift is the mean
    image-minus-caption difference and its residual is what is left (never more than the whole gap)."""
    from modeling_clipcap.text_only import NoisyTextEmbeddings, estimate_noise_std

    rng = np.random.default_rng(0)
    text = rng.normal(size=(6, 4)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    offset = np.array([0.3, -0.2, 0.0, 0.1], dtype=np.float32)
    image = text + offset + 0.01 * rng.normal(size=(6, 4)).astype(np.float32)

    class Towers:  # stands in for retrieval.Towers: fixed embeddings per input
        def encode_images(self, items):
            return image[items]

        def encode_texts(self, items):
            return text[items]

    gap = estimate_noise_std(Towers(), list(range(6)), list(range(6)))
    np.testing.assert_allclose(gap["shift"], (image - text).mean(axis=0), atol=1e-6)
    assert gap["gap_norm"] == pytest.approx(float(np.linalg.norm((image - text).mean(axis=0))), rel=1e-5)
    # the offset is shared: little is left after the shift
    assert gap["residual_std"] < 0.05 < gap["noise_std"]
    rows = NoisyTextEmbeddings(text, [f"c{i}" for i in range(6)], 0.0, shift=gap["shift"])
    np.testing.assert_allclose(rows[2]["image_embeds"].numpy(), text[2] + np.asarray(gap["shift"]), atol=1e-6)
    assert torch.equal(
        NoisyTextEmbeddings(text, ["c"] * 6, 0.0)[2]["image_embeds"], torch.from_numpy(text[2])
    )
    with pytest.raises(ValueError, match="shift"):
        NoisyTextEmbeddings(text, ["c"] * 6, 0.0, shift=[0.0, 1.0])


def test_text_file_adds_text_rows_to_paired_training(tmp_path, towers_dir, tiny_tokenizer):
    """train.py --text_file: the pairs are read (their images encoded) and the corpus joins them as noisy text
    rows (with --modality_shift: moved by the paired sample's mean gap); the mapper moves and the model captions."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import train

    from modeling_clipcap import ClipCapForConditionalGeneration

    lm, corpus, pairs = write_lm_corpus_and_pairs(
        tmp_path, tiny_tokenizer, corpus_repeat=3, image_seed=3, two_captions=True
    )
    common = [
        "--text_model_name_or_path", str(lm), "--train_file", str(pairs),
        "--validation_file", str(pairs), "--max_train_steps", "4",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--num_warmup_steps", "0",
        "--mapping_type", "mlp", "--prefix_length", "2", "--max_new_tokens", "4", "--no_eval_meteor",
        "--embedding_cache_dir", str(tmp_path / "cache"), "--vision_model_name_or_path", str(towers_dir),
    ]  # fmt: skip
    out = tmp_path / "out"
    summary = train.main(common + [
        "--text_file", str(corpus), "--noise_sample_file", str(pairs), "--modality_shift",
        "--output_dir", str(out),
    ])  # fmt: skip
    assert summary["training_data"].endswith(f"+ {len(CAPTIONS) * 3} text rows of {corpus}")
    assert "(4 images, 8 captions)" in summary["training_data"]
    rows = summary["text_rows"]
    assert rows["modality_shift"] and rows["noise_std"] == rows["residual_std"] and rows["gap_norm"] > 0
    assert summary["images_encoded_per_rank"][0] >= 4  # the training images are read, unlike --text_only
    model = ClipCapForConditionalGeneration.from_pretrained(out)
    assert model.config.normalize_prefix
    fresh = fresh_model(towers_dir, lm)
    assert all(moved(model.model.mapping_network, fresh.model.mapping_network))
    assert model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=3).shape[0] == 2
    with pytest.raises(SystemExit):  # --text_file and --text_only contradict each other
        train.parse_args(common + ["--text_file", str(corpus), "--text_only", "--output_dir", str(out)])
    with pytest.raises(ValueError, match="embedding cache"):  # text rows join image embeddings, not images
        train.main(
            common + ["--text_file", str(corpus), "--no_embedding_cache", "--output_dir", str(out / "x")]
        )
    with pytest.raises(SystemExit):  # the shift is measured on pairs
        train.parse_args(common + ["--text_file", str(corpus), "--modality_shift", "--output_dir", str(out)])


def test_pretrain_lm_loss_matches_transformers_and_training_lowers_it(tmp_path, tiny_tokenizer, caplog):
    """training/pretrain_lm.py: its next-token loss equals the LM's own ``labels=`` loss (padding ignored), a short
    run lowers it and saves an LM that loads with AutoModelForCausalLM, and transformers does not warn about the
    loss type."""
    import logging

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import pretrain_lm
    from conftest import tiny_text_config
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(tiny_text_config(len(tiny_tokenizer))).eval()
    pad = tiny_tokenizer.eos_token_id
    inputs = pretrain_lm.collate(pretrain_lm.encode(CAPTIONS[:4], tiny_tokenizer, 16), pad)
    assert (inputs["labels"] == -100).any()  # captions of different lengths: some padding
    with torch.no_grad():
        logits = lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        terms = [  # by hand: -log p(token t+1 | tokens <= t) over the real tokens
            -torch.log_softmax(logits[b, t], -1)[inputs["labels"][b, t + 1]]
            for b in range(logits.shape[0])
            for t in range(logits.shape[1] - 1)
            if inputs["labels"][b, t + 1] != -100
        ]
        expected = torch.stack(terms).mean()
        assert torch.allclose(pretrain_lm.next_token_loss(lm, inputs), expected, atol=1e-5)
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # a warning given earlier in this process would not repeat
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS * 4) + "\n")
    out = tmp_path / "read"
    with caplog.at_level(logging.WARNING):
        summary = pretrain_lm.pretrain_lm(
            pretrain_lm.build_parser().parse_args([
                "--model_name_or_path", str(tmp_path / "lm"), "--train_file", str(corpus), "--output_dir", str(out),
                "--max_steps", "30", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
                "--num_warmup_steps", "0", "--no_progress",
            ])
        )  # fmt: skip
    assert summary["final_loss"] < 0.85 * summary["first_loss"], summary  # measured: 5.14 -> 3.88
    assert not [r for r in caplog.records if "loss_type" in r.getMessage()]
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == lm.config.n_layer
