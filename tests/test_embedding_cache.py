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
        direct = model.get_image_features(pixel_values).pooler_output[0]
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


def test_keys_must_match_images_and_policy_is_checked(encoder, image_files):
    model, image_processor, _ = encoder
    with pytest.raises(ValueError, match="one key per image"):
        build_embedding_cache(model, image_processor, image_files, keys=["a"], show_progress=False)
    with pytest.raises(ValueError, match="on_bad_image"):
        build_embedding_cache(model, image_processor, image_files, on_bad_image="ignore", show_progress=False)
