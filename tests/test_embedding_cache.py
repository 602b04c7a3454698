"""modeling_clipcap.embedding_cache: each unique image encoded once, reused by fingerprint."""

from __future__ import annotations

import io
import os

import pytest
import torch
from PIL import Image

from modeling_clipcap import ClipCapForConditionalGeneration
from modeling_clipcap.embedding_cache import build_embedding_cache, encoder_fingerprint, image_identity
from modeling_clipcap.image_io import ImageLoadError


class EncodeCounter:
    """Counts images and calls that reach the CLIP vision tower."""

    def __init__(self, model):
        self.images = 0
        self.calls = 0
        model.vision_model.register_forward_hook(self._hook)

    def _hook(self, module, args, kwargs_or_output, *rest):
        self.calls += 1

    def count_pre(self, module, args, kwargs):
        self.images += kwargs["pixel_values"].shape[0]


@pytest.fixture()
def encoder(tiny_config, tiny_processor):
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(tiny_config).eval()
    counter = EncodeCounter(model)
    model.vision_model.register_forward_pre_hook(counter.count_pre, with_kwargs=True)
    return model, tiny_processor.image_processor, counter


@pytest.fixture()
def image_files(tmp_path):
    paths = []
    for i in range(7):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), (30 * i, 255 - 30 * i, 7 * i)).save(path)
        paths.append(str(path))
    return paths


def test_each_unique_image_is_encoded_once_and_a_second_run_encodes_none(encoder, image_files, tmp_path):
    model, image_processor, counter = encoder
    sources = image_files + image_files[:3]  # captions of the same image repeat it
    keys = [os.path.basename(p) for p in sources]
    cache = build_embedding_cache(
        model,
        image_processor,
        sources,
        keys=keys,
        cache_dir=tmp_path / "c",
        batch_size=3,
        show_progress=False,
    )
    assert counter.images == 7 and counter.calls == 3  # batches of 3: 3 + 3 + 1
    assert cache.num_encoded == 7 and cache.num_reused == 0 and len(cache.keys) == 7
    embeds = cache.embeddings()
    assert embeds.shape == (7, 24) and embeds.dtype == torch.float32

    again = build_embedding_cache(
        model,
        image_processor,
        sources,
        keys=keys,
        cache_dir=tmp_path / "c",
        batch_size=3,
        show_progress=False,
    )
    assert counter.images == 7  # nothing re-encoded
    assert again.num_encoded == 0 and again.num_reused == 7 and again.path == cache.path
    assert torch.equal(again.embeddings(), embeds)

    # the cached rows are the encoder's output for that image
    pixel_values = image_processor([Image.open(image_files[4])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model.get_image_embeddings(pixel_values).pooler_output[0]
    torch.testing.assert_close(embeds[cache.index["4.png"]], direct, rtol=1e-5, atol=1e-6)


def test_new_weights_or_changed_images_get_a_new_cache(encoder, image_files, tmp_path):
    model, image_processor, counter = encoder
    first = build_embedding_cache(
        model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
    )
    fp = encoder_fingerprint(model, image_processor)

    with torch.no_grad():  # different encoder weights
        model.vision_model.visual_projection.weight.add_(0.01)
    assert encoder_fingerprint(model, image_processor) != fp
    second = build_embedding_cache(
        model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
    )
    assert second.num_encoded == 7 and second.fingerprint != first.fingerprint
    assert not torch.equal(second.embeddings(), first.embeddings())

    # a changed file (new size/mtime) is a different data set
    Image.new("RGB", (41, 30), (1, 2, 3)).save(image_files[0])
    os.utime(image_files[0], ns=(1, 1))
    third = build_embedding_cache(
        model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
    )
    assert third.num_encoded == 7 and third.fingerprint != second.fingerprint
    assert counter.images == 21
    # different compute dtype: different fingerprint
    assert encoder_fingerprint(model, image_processor, torch.bfloat16) != encoder_fingerprint(
        model, image_processor
    )


def test_bytes_pil_and_dataset_dicts_are_identified_by_content(image_files):
    data = open(image_files[1], "rb").read()
    assert image_identity(data) == image_identity({"bytes": data, "path": None})
    assert image_identity(data) != image_identity(open(image_files[2], "rb").read())
    assert image_identity(Image.open(io.BytesIO(data))) == image_identity(Image.open(image_files[1]))
    assert image_identity({"bytes": None, "path": image_files[1]}) == image_identity(image_files[1])


def test_bad_images_fail_by_default_or_are_skipped_and_listed(encoder, image_files, tmp_path):
    model, image_processor, _ = encoder
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sources = image_files + [str(bad)]
    with pytest.raises(ImageLoadError, match="broken.png"):
        build_embedding_cache(model, image_processor, sources, cache_dir=tmp_path / "c", show_progress=False)
    assert not any((tmp_path / "c").glob("clipcap-embeds-*"))  # nothing half-written was kept
    cache = build_embedding_cache(
        model, image_processor, sources, cache_dir=tmp_path / "c", on_bad_image="skip", show_progress=False
    )
    assert cache.num_encoded == 7 and len(cache.keys) == 7
    assert len(cache.skipped) == 1 and cache.skipped[0][0].endswith("broken.png")
    reread = build_embedding_cache(
        model, image_processor, sources, cache_dir=tmp_path / "c", on_bad_image="skip", show_progress=False
    )
    assert reread.num_encoded == 0 and reread.skipped == cache.skipped  # the report survives the cache


def test_no_readable_image_at_all_is_a_clear_error(encoder, tmp_path):
    """Every image unreadable with on_bad_image="skip": an error that says so and names them, not a crash
    deep inside datasets; nothing is left in the cache folder."""
    model, image_processor, _ = encoder
    bad = []
    for name in ("a.png", "b.jpg"):
        bad.append(tmp_path / name)
        bad[-1].write_bytes(b"<html>not an image</html>")
    with pytest.raises(ImageLoadError, match=r"no readable image.*a\.png"):
        build_embedding_cache(
            model, image_processor, [str(p) for p in bad], cache_dir=tmp_path / "c", on_bad_image="skip",
            show_progress=False,
        )  # fmt: skip
    assert not any((tmp_path / "c").glob("clipcap-embeds-*"))


def test_keys_must_match_images_and_policy_is_checked(encoder, image_files):
    model, image_processor, _ = encoder
    with pytest.raises(ValueError, match="one key per image"):
        build_embedding_cache(model, image_processor, image_files, keys=["a"], show_progress=False)
    with pytest.raises(ValueError, match="on_bad_image"):
        build_embedding_cache(model, image_processor, image_files, on_bad_image="ignore", show_progress=False)


# ----------------------------------------------------------------------------- what the mapper consumes


def _tokens_twin(model, tiny_tokenizer):
    """A transformer-mapper model reading token features, with ``model``'s vision tower weights."""
    from conftest import tiny_clipcap_config

    config = tiny_clipcap_config(len(tiny_tokenizer), "transformer", mapping_input="tokens")
    twin = ClipCapForConditionalGeneration(config).eval()
    twin.vision_model.load_state_dict(model.vision_model.state_dict())
    return twin


def test_a_tokens_model_caches_token_features_never_the_pooled_cache(
    encoder, image_files, tiny_tokenizer, tmp_path
):
    model, image_processor, counter = encoder
    pooled = build_embedding_cache(
        model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
    )
    twin = _tokens_twin(model, tiny_tokenizer)
    # same tower, same processor, same data: only mapping_input differs, and it is part of the fingerprint
    assert encoder_fingerprint(twin, image_processor) != encoder_fingerprint(model, image_processor)
    assert encoder_fingerprint(model, image_processor, mapping_input="tokens") == encoder_fingerprint(
        twin, image_processor
    )
    tokens = build_embedding_cache(
        twin, image_processor, image_files, cache_dir=tmp_path, show_progress=False
    )
    assert tokens.num_encoded == 7 and tokens.num_reused == 0 and tokens.path != pooled.path
    assert pooled.mapping_input == "pooled" and tokens.mapping_input == "tokens"
    embeds = tokens.embeddings()
    assert embeds.shape == (7, 17, 32)  # CLS + (32 / 8)**2 patches, CLIP hidden_size (not projection_dim 24)
    assert pooled.embeddings().shape == (7, 24)
    info = (tokens.path / "cache_info.json").read_text()
    assert '"mapping_input": "tokens"' in info and '"embedding_shape": [\n    17,\n    32\n  ]' in info
    # a row is the tower's last_hidden_state for that image, and feeds the model as image_embeds
    pixel_values = image_processor([Image.open(image_files[4])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = twin.get_image_embeddings(pixel_values).last_hidden_state[0]
    torch.testing.assert_close(embeds[tokens.index[tokens.keys[4]]], direct, rtol=1e-5, atol=1e-6)
    kwargs = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(
        twin.generate(image_embeds=embeds[4:5], **kwargs), twin.generate(pixel_values=pixel_values, **kwargs)
    )
    # reread from disk; the lazy view gives the same rows in the asked order
    again = build_embedding_cache(twin, image_processor, image_files, cache_dir=tmp_path, show_progress=False)
    assert again.num_reused == 7 and again.num_encoded == 0 and again.mapping_input == "tokens"
    view = again.rows([3, 0, 3])
    assert view.shape == (3, 17, 32) and len(view) == 3
    assert (
        torch.equal(view[0], embeds[3])
        and torch.equal(view[1], embeds[0])
        and torch.equal(view[2], embeds[3])
    )
    # and the pooled model still finds its own cache
    assert (
        build_embedding_cache(
            model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
        ).num_reused
        == 7
    )


def test_embed_split_gives_token_rows_in_split_order(encoder, image_files, tiny_tokenizer, tmp_path):
    import datasets

    from modeling_clipcap.embedding_cache import CachedRows
    from modeling_clipcap.training_data import CachedCaptionDataset, embed_split

    model, image_processor, _ = encoder
    twin = _tokens_twin(model, tiny_tokenizer)
    order = [5, 1, 1, 6]
    images = datasets.Dataset.from_dict(
        {"image": [image_files[i] for i in order], "image_id": [f"{i}.png" for i in order]}
    )
    split = embed_split(twin, image_processor, images, cache_dir=tmp_path, show_progress=False)
    assert isinstance(split.embeds, CachedRows) and split.embeds.shape == (4, 17, 32)
    assert split.stats["encoded"] == 3 and split.stats["mapping_input"] == "tokens"
    pixel_values = image_processor([Image.open(image_files[i]) for i in order], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        direct = twin.get_image_embeddings(pixel_values).last_hidden_state
    for row in range(4):
        torch.testing.assert_close(split.embeds[row], direct[row], rtol=1e-5, atol=1e-6)
    rows = CachedCaptionDataset(split.embeds, [2, 0], ["a", "b"])
    assert torch.equal(rows[0]["image_embeds"], split.embeds[2]) and rows[1]["caption"] == "b"
    pooled = embed_split(model, image_processor, images, cache_dir=tmp_path, show_progress=False)
    assert torch.is_tensor(pooled.embeds) and pooled.embeds.shape == (4, 24)


@pytest.mark.parametrize("mapping_input", ["pooled", "tokens"])
def test_siglip2_mask_and_shapes_reach_the_tower(mapping_input, image_files, tmp_path):
    """SigLIP2's processor gives patches, their mask and the grid shapes: the cache passes all three to the
    tower, so each row equals the model's own features (pooled: masked attention pooling; tokens: the N slots)."""
    from conftest import tiny_text_config
    from transformers import AutoConfig, Siglip2ImageProcessorPil

    from modeling_clipcap import ClipCapConfig

    tower = AutoConfig.for_model(
        "siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_patches=16, patch_size=8,
    )  # fmt: skip
    extra = dict(mapping_type="transformer", mapping_num_heads=4) if mapping_input == "tokens" else {}
    config = ClipCapConfig(vision_config=tower, text_config=tiny_text_config(300), prefix_length=3,
                           mapping_input=mapping_input, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config).eval()
    processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (80, 20), (200, 20, 20)).save(wide)  # an aspect ratio unlike image 0's (40 x 30)
    sources = [image_files[0], str(wide)]
    cache = build_embedding_cache(model, processor, sources, batch_size=2, show_progress=False)
    inputs = processor([Image.open(s) for s in sources], return_tensors="pt")
    assert min(inputs["pixel_attention_mask"].sum(1).tolist()) < 16  # one image leaves patch slots empty
    with torch.no_grad():
        features = model.get_image_embeddings(**inputs)
        all_ones = dict(inputs, pixel_attention_mask=torch.ones_like(inputs["pixel_attention_mask"]))
        unmasked = model.get_image_embeddings(**all_ones)
    expected = features.last_hidden_state if mapping_input == "tokens" else features.pooler_output
    unmasked = unmasked.last_hidden_state if mapping_input == "tokens" else unmasked.pooler_output
    embeds = cache.embeddings()
    assert embeds.shape == expected.shape
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)
    # the mask matters: the padded image's features differ from those of an all-ones mask
    padded = int(inputs["pixel_attention_mask"].sum(1).argmin())
    assert not torch.allclose(embeds[padded], unmasked[padded], atol=1e-3)
    kwargs = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(image_embeds=embeds, **kwargs), model.generate(**inputs, **kwargs))


# ----------------------------------------------------------------------------- the on-disk format


def _write_format_2_cache(cache_dir, fingerprint, keys, embeds, mapping_input, skipped=()):
    """The layout build_embedding_cache wrote before the Parquet cache (format 2, up to commit 23f5e71), rebuilt
    here: ``clipcap-embeds-<fingerprint>/data`` is a ``datasets`` ``save_to_disk`` folder with ``image_key`` and
    ``image_embeds`` (a fixed-length float32 list per image, or an Array2D (N, D) for tokens), beside
    ``cache_info.json``."""
    import json

    import datasets

    folder = cache_dir / f"clipcap-embeds-{fingerprint}"
    if mapping_input == "tokens":
        column = datasets.Array2D(shape=tuple(embeds.shape[1:]), dtype="float32")
    else:
        column = datasets.List(datasets.Value("float32"), length=embeds.shape[1])
    features = datasets.Features({"image_key": datasets.Value("string"), "image_embeds": column})
    rows = datasets.Dataset.from_dict({"image_key": keys, "image_embeds": embeds.numpy()}, features=features)
    rows.save_to_disk(str(folder / "data"))
    info = {
        "format_version": "2", "fingerprint": fingerprint, "dtype": "torch.float32", "num_images": len(keys),
        "num_embeddings": len(keys), "image_embed_dim": embeds.shape[-1], "mapping_input": mapping_input,
        "embedding_shape": list(embeds.shape[1:]), "skipped": [list(s) for s in skipped], "seconds": 0.1,
    }  # fmt: skip
    (folder / "cache_info.json").write_text(json.dumps(info, indent=2))
    return folder


@pytest.mark.parametrize("mapping_input", ["pooled", "tokens"])
def test_a_format_2_arrow_cache_is_converted_once_with_a_log_line_and_the_same_embeddings(
    mapping_input, encoder, image_files, tiny_tokenizer, tmp_path, caplog
):
    import logging

    import pyarrow.parquet as pq

    model, image_processor, counter = encoder
    if mapping_input == "tokens":
        model = _tokens_twin(model, tiny_tokenizer)
        model.vision_model.register_forward_pre_hook(counter.count_pre, with_kwargs=True)
    reference = build_embedding_cache(model, image_processor, image_files, show_progress=False)  # not stored
    encoded = counter.images
    # the old cache holds other numbers than the encoder gives: the converted rows must come from the file
    old_embeds = reference.embeddings() + torch.arange(7.0).reshape(
        -1, *[1] * (reference.embeddings().ndim - 1)
    )
    skipped = [("gone.png", "missing file")]
    old = _write_format_2_cache(
        tmp_path, reference.fingerprint, reference.keys, old_embeds, mapping_input, skipped
    )

    with caplog.at_level(logging.INFO, logger="modeling_clipcap.embedding_cache"):
        cache = build_embedding_cache(
            model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
        )
    converted = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(converted) == 1 and "Arrow layout (format 2) to Parquet (format 3)" in converted[0], converted
    assert old.name in converted[0] and "7 embeddings read, none encoded again" in converted[0]
    assert counter.images == encoded and cache.num_encoded == 0 and cache.num_reused == 7
    assert not old.exists() and cache.path.name == f"clipcap-embeds-v3-{reference.fingerprint}"
    assert cache.keys == reference.keys and cache.skipped == skipped
    assert torch.equal(cache.embeddings(), old_embeds)
    assert torch.equal(cache.rows([6, 0])[0], old_embeds[6])
    column = {"pooled": "image_embeds", "tokens": "patch_tokens"}[mapping_input]
    assert pq.read_schema(cache.path / "embeddings.parquet").names == ["key", column]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modeling_clipcap.embedding_cache"):
        again = build_embedding_cache(
            model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
        )
    assert not [r for r in caplog.records if "converted" in r.getMessage()]  # read once: now it is Parquet
    assert again.num_reused == 7 and torch.equal(again.embeddings(), old_embeds) and counter.images == encoded


def test_an_unreadable_format_2_cache_is_rebuilt_with_a_warning(encoder, image_files, tmp_path, caplog):
    import logging

    model, image_processor, counter = encoder
    reference = build_embedding_cache(model, image_processor, image_files, show_progress=False)
    old = _write_format_2_cache(
        tmp_path, reference.fingerprint, reference.keys, reference.embeddings(), "pooled"
    )
    for arrow in (old / "data").glob("*.arrow"):
        arrow.write_bytes(b"cut short")
    with caplog.at_level(logging.INFO, logger="modeling_clipcap.embedding_cache"):
        cache = build_embedding_cache(
            model, image_processor, image_files, cache_dir=tmp_path, show_progress=False
        )
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "encoded again" in r.getMessage()]
    assert len(warned) == 1 and old.name in warned[0].getMessage()
    assert cache.num_encoded == 7 and counter.images == 14
    torch.testing.assert_close(cache.embeddings(), reference.embeddings())


def test_token_rows_are_read_lazily_one_row_group_at_a_time(
    encoder, image_files, tiny_tokenizer, tmp_path, monkeypatch
):
    """Row groups as small as one row: any order of rows reads back the stored rows, also in the copy (the state
    a DataLoader worker gets)."""
    import copy

    import pyarrow.parquet as pq

    from modeling_clipcap import embedding_cache

    monkeypatch.setattr(embedding_cache, "ROW_GROUP_BYTES", 1)
    twin = _tokens_twin(encoder[0], tiny_tokenizer)
    cache = build_embedding_cache(twin, encoder[1], image_files, cache_dir=tmp_path, show_progress=False)
    assert pq.ParquetFile(cache.path / "embeddings.parquet").metadata.num_row_groups == 7
    embeds, order = cache.embeddings(), [6, 2, 2, 0, 5]
    view = cache.rows(order)
    assert view.shape == (5, 17, 32)
    assert all(torch.equal(view[i], embeds[r]) for i, r in enumerate(order))
    # a loader worker gets the view through its state (__getstate__, as a spawned worker would): no open file
    worker_copy = copy.deepcopy(view)
    assert all(torch.equal(worker_copy[i], embeds[r]) for i, r in enumerate(order))


def test_the_cache_and_clipcap_embed_write_one_format(encoder, image_files, tmp_path):
    """The cache's Parquet file and a `clipcap embed` shard of the same images: the same column types, and the same
    embeddings (one writer, shards.embedding_table)."""
    import tarfile

    import pyarrow.parquet as pq

    from modeling_clipcap.embed import embed_shards
    from modeling_clipcap.shards import embedding_values

    model, image_processor, _ = encoder
    with tarfile.open(tmp_path / "shard-0000.tar", "w") as tar:
        for i, path in enumerate(image_files):
            tar.add(path, arcname=f"{i:03d}.png")
            caption = tmp_path / f"{i}.txt"
            caption.write_text(f"picture {i}")
            tar.add(caption, arcname=f"{i:03d}.txt")
    embed_shards(
        model, image_processor, str(tmp_path / "shard-0000.tar"), tmp_path / "emb", show_progress=False
    )
    shard = pq.read_table(tmp_path / "emb" / "shard-0000.parquet")
    cache = build_embedding_cache(
        model, image_processor, image_files, cache_dir=tmp_path / "c", show_progress=False
    )
    stored = pq.read_table(cache.path / "embeddings.parquet")
    assert shard.column_names == ["key", "caption", "image_embeds"] and stored.column_names == [
        "key",
        "image_embeds",
    ]
    assert all(
        stored.schema.field(name).type == shard.schema.field(name).type for name in stored.column_names
    )
    assert torch.equal(embedding_values(shard.column("image_embeds")), cache.embeddings())
