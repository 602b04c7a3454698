"""Tests for modeling_clipcap.data: readers, validation, report, explode, collator."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from modeling_clipcap.data import (
    CaptionCollator,
    CaptionDataError,
    count_truncated_captions,
    explode_captions,
    load_caption_dataset,
    load_caption_file,
    load_example_image,
    load_hf_caption_dataset,
    load_karpathy_json,
)
from modeling_clipcap.image_io import ImageLoadError


def _img(path: Path, color=(200, 10, 10), size=(6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        _img(tmp_path / name)
    return tmp_path


# ------------------------------------------------------------------ image folder + metadata


def test_jsonl_caption_and_captions_merge_clean_and_count(folder):
    meta = _jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "a.png", "caption": "a red  square. "},
            {"file_name": "./a.png", "caption": "a red square."},  # duplicate after normalization
            {"file_name": "a.png", "caption": "   "},  # whitespace only
            {"file_name": "b.png", "captions": ["one.", "two.", "", "one."], "num_objects": 2},
            {"file_name": "sub/c.png", "caption": ""},  # no caption left -> image dropped
        ],
    )
    ds, report = load_caption_file(meta)
    assert ds.column_names[:3] == ["image_id", "image", "captions"]
    rows = {r["image_id"]: r for r in ds}
    assert set(rows) == {"a.png", "b.png"}
    assert rows["a.png"]["captions"] == ["a red square."]
    assert rows["b.png"]["captions"] == ["one.", "two."]
    assert rows["b.png"]["num_objects"] == 2 and rows["a.png"]["num_objects"] is None
    assert Path(rows["a.png"]["image"]) == (folder / "a.png").absolute()
    assert (report.num_rows_read, report.num_images, report.num_captions) == (5, 2, 3)
    assert report.empty_captions_dropped == 3 and report.duplicate_captions_dropped == 2
    assert report.images_without_captions_dropped == 1
    text = report.summary()
    assert "2 images, 3 captions" in text and "duplicate captions dropped: 2" in text
    assert json.loads(json.dumps(report.to_dict()))["num_images"] == 2


def test_csv_with_captions_list_and_folder_dispatch(folder):
    (folder / "metadata.csv").write_text(
        'file_name,caption\na.png,"a red square, small."\nsub/c.png,another one.\n', encoding="utf-8"
    )
    ds, report = load_caption_dataset(folder)  # a folder with metadata.csv
    assert sorted(ds["image_id"]) == ["a.png", "sub/c.png"]
    assert ds.filter(lambda r: r["image_id"] == "a.png")[0]["captions"] == ["a red square, small."]
    (folder / "list.csv").write_text('file_name,captions\nb.png,"[""x."", ""y.""]"\n', encoding="utf-8")
    ds2, _ = load_caption_file(folder / "list.csv")
    assert ds2[0]["captions"] == ["x.", "y."]


def test_split_subfolder_dispatch(tmp_path):
    _img(tmp_path / "test" / "t.png")
    _jsonl(tmp_path / "test" / "metadata.jsonl", [{"file_name": "t.png", "caption": "t."}])
    ds, _ = load_caption_dataset(tmp_path, split="test")
    assert ds["image_id"] == ["t.png"]


def test_missing_images_fail_with_list_and_count_or_skip(folder):
    rows = [{"file_name": "a.png", "caption": "x."}] + [
        {"file_name": f"gone{i}.png", "caption": "y."} for i in range(25)
    ]
    (folder / "empty.png").write_bytes(b"")
    rows.append({"file_name": "empty.png", "caption": "z."})
    meta = _jsonl(folder / "metadata.jsonl", rows)
    with pytest.raises(CaptionDataError) as info:
        load_caption_file(meta)
    msg = str(info.value)
    assert "26 of 27 images are missing or unreadable" in msg and "gone0.png" in msg and "and 6 more" in msg
    assert "on_bad_image='skip'" in msg
    ds, report = load_caption_file(meta, on_bad_image="skip")
    assert ds["image_id"] == ["a.png"]
    assert len(report.skipped_images) == 26
    reasons = dict((Path(n).name, r) for n, r in report.skipped_images)
    assert reasons["gone3.png"] == "file does not exist" and "0 bytes" in reasons["empty.png"]
    assert "images skipped" in report.summary()
    with pytest.raises(ValueError, match="on_bad_image"):
        load_caption_file(meta, on_bad_image="drop")
    with pytest.raises(CaptionDataError, match="26 of 27"):  # "error" is the other name of "fail"
        load_caption_file(meta, on_bad_image="error")


def test_verify_images_catches_corrupt_files(folder):
    (folder / "bad.png").write_bytes(b"not a png at all")
    meta = _jsonl(
        folder / "metadata.jsonl",
        [{"file_name": "a.png", "caption": "x."}, {"file_name": "bad.png", "caption": "y."}],
    )
    ds, _ = load_caption_file(meta)  # existence check only: passes
    assert ds.num_rows == 2
    with pytest.raises(CaptionDataError, match=r"bad\.png.*not an image"):
        load_caption_file(meta, verify_images=True)
    ds, report = load_caption_file(meta, verify_images=True, on_bad_image="skip")
    assert ds["image_id"] == ["a.png"] and "not an image" in report.skipped_images[0][1]
    with pytest.raises(ImageLoadError, match=r"bad\.png"):
        load_example_image(str(folder / "bad.png"))


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd", ".."])
def test_file_name_escaping_the_folder_is_refused(folder, name):
    _img(folder.parent / "outside.png")
    meta = _jsonl(
        folder / "metadata.jsonl",
        [{"file_name": "a.png", "caption": "x."}, {"file_name": name, "caption": "y."}],
    )
    for policy in ("fail", "skip"):
        with pytest.raises(CaptionDataError, match=r"line 2.*(escapes|absolute)"):
            load_caption_file(meta, on_bad_image=policy)


def test_inner_dotdot_that_stays_inside_is_fine(folder):
    meta = _jsonl(folder / "metadata.jsonl", [{"file_name": "sub/../a.png", "caption": "x."}])
    ds, _ = load_caption_file(meta)
    assert ds["image_id"] == ["a.png"]


def test_malformed_jsonl_line_reported_with_number(folder):
    meta = _jsonl(
        folder / "metadata.jsonl",
        [{"file_name": "a.png", "caption": "x."}, "", '{"file_name": "b.png", "caption": '],
    )
    with pytest.raises(CaptionDataError, match=r"metadata\.jsonl: line 3: malformed JSON"):
        load_caption_file(meta)
    _jsonl(meta, ['["a.png", "x."]'])
    with pytest.raises(CaptionDataError, match="line 1: expected a JSON object"):
        load_caption_file(meta)


def test_malformed_csv_line_reported_with_number(folder):
    csv_path = folder / "m.csv"
    csv_path.write_text("file_name,caption\na.png,fine.\nb.png,too,many,fields\n", encoding="utf-8")
    with pytest.raises(CaptionDataError, match=r"m\.csv: line 3: 4 fields, but the header has 2"):
        load_caption_file(csv_path)
    csv_path.write_text("name,text\na.png,x.\n", encoding="utf-8")
    with pytest.raises(CaptionDataError, match="no 'file_name' column"):
        load_caption_file(csv_path)


def test_non_utf8_text_reported_with_file_and_line(folder):
    meta = folder / "metadata.jsonl"
    meta.write_bytes(
        b'{"file_name": "a.png", "caption": "ok."}\n{"file_name": "b.png", "caption": "caf\xe9."}\n'
    )
    with pytest.raises(CaptionDataError, match=r"metadata\.jsonl: line 2: not valid UTF-8.*0xe9"):
        load_caption_file(meta)


def test_non_text_caption_is_an_error(folder):
    meta = _jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "caption": 42}])
    with pytest.raises(CaptionDataError, match="line 1: a caption must be text"):
        load_caption_file(meta)


# ------------------------------------------------------------------ Karpathy / COCO JSON


def _karpathy(tmp_path: Path) -> Path:
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        _img(tmp_path / "imgs" / f"{i}.jpg")
        images.append(
            {
                "filepath": "imgs",
                "filename": f"{i}.jpg",
                "cocoid": 100 + i,
                "split": split,
                "sentences": [
                    {"raw": f"caption {i} one.", "tokens": []},
                    {"raw": " ", "tokens": []},
                    {"tokens": ["caption", str(i), "two"]},
                ],
            }
        )
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}, indent=1))
    return path


def test_karpathy_splits_and_restval(tmp_path):
    path = _karpathy(tmp_path)
    test, report = load_karpathy_json(path, "test")
    assert test["image_id"] == ["103", "104"]
    assert test[0]["captions"] == ["caption 3 one.", "caption 3 two"]
    assert report.empty_captions_dropped == 2
    assert Path(test[0]["image"]) == (tmp_path / "imgs" / "3.jpg").absolute()
    train, _ = load_karpathy_json(path, "train")
    assert train["image_id"] == ["100", "101"]
    train_only, _ = load_karpathy_json(path, "train", train_includes_restval=False)
    assert train_only["image_id"] == ["100"]
    val, _ = load_caption_dataset(path, split="validation")
    assert val["image_id"] == ["102"]
    with pytest.raises(CaptionDataError, match=r"no images in split 'nocaps'.*'restval'"):
        load_karpathy_json(path, "nocaps")


def test_karpathy_malformed_json_reports_line(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",\n  "sentences": [}\n]}')
    with pytest.raises(CaptionDataError, match=r"dataset_coco\.json: malformed JSON at line 3"):
        load_caption_dataset(path)


def test_karpathy_escape_refused(tmp_path):
    path = tmp_path / "k.json"
    entry = {"filepath": "..", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "x."}]}
    path.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(CaptionDataError, match=r"images\[0\].*escapes"):
        load_karpathy_json(path, "test")


def test_official_coco_captions_json(tmp_path):
    _img(tmp_path / "val" / "x.jpg")
    path = tmp_path / "captions_val.json"
    data = {
        "images": [{"id": 7, "file_name": "val/x.jpg"}],
        "annotations": [{"image_id": 7, "caption": "one."}, {"image_id": 7, "caption": "two."}],
    }
    path.write_text(json.dumps(data))
    ds, report = load_caption_dataset(path)
    assert ds["image_id"] == ["7"] and ds[0]["captions"] == ["one.", "two."] and report.num_rows_read == 2


# ------------------------------------------------------------------ datasets sources


def test_hf_dataset_with_image_feature_and_grouping(tmp_path):
    imgs = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"img": [imgs[0], imgs[0], imgs[1], imgs[2]], "text": ["a.", "b.", " ", "c."], "id": [1, 1, 2, 3]},
        features=datasets.Features(
            {"img": datasets.Image(), "text": datasets.Value("string"), "id": datasets.Value("int64")}
        ),
    )
    dd = datasets.DatasetDict({"train": ds})
    dd.save_to_disk(str(tmp_path / "saved"))
    out, report = load_caption_dataset(
        tmp_path / "saved", split="train", image_column="img", caption_column="text", image_id_column="id"
    )
    assert out.column_names == ["image_id", "image", "captions"]
    assert out["image_id"] == ["1", "3"] and out["captions"] == [["a.", "b."], ["c."]]
    assert report.images_without_captions_dropped == 1 and report.empty_captions_dropped == 1
    assert load_example_image(out[1]["image"]).getpixel((0, 0)) == (80, 0, 0)
    with pytest.raises(CaptionDataError, match="choose a split"):
        load_hf_caption_dataset(tmp_path / "saved")
    with pytest.raises(CaptionDataError, match="no column 'caption'"):
        load_hf_caption_dataset(tmp_path / "saved", "train", image_column="img")


def test_hf_dataset_with_path_column_and_caption_lists(tmp_path):
    good = _img(tmp_path / "g.png")
    ds = datasets.Dataset.from_dict(
        {"image": [str(good), str(tmp_path / "missing.png")], "caption": [["x.", "y."], ["z."]]}
    )
    with pytest.raises(CaptionDataError, match=r"missing\.png: file does not exist"):
        load_hf_caption_dataset("mem", dataset=ds)
    out, report = load_hf_caption_dataset("mem", dataset=ds, on_bad_image="skip")
    assert out["image"] == [str(good)] and out["captions"] == [["x.", "y."]]
    assert report.num_images == 1 and report.num_captions == 2 and len(report.skipped_images) == 1


def test_hf_verify_images_bytes(tmp_path):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, "PNG")
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": buf.getvalue(), "path": "ok.png"}, {"bytes": b"junk", "path": "junk.png"}],
            "caption": ["a.", "b."],
        },
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    out, _ = load_hf_caption_dataset("mem", dataset=ds)
    assert out.num_rows == 2  # not decoded unless asked
    out, report = load_hf_caption_dataset("mem", dataset=ds, verify_images=True, on_bad_image="skip")
    assert out["captions"] == [["a."]] and report.skipped_images[0][0] == "junk.png"


def test_nonexistent_local_path_is_clear(tmp_path):
    with pytest.raises(CaptionDataError, match="does not exist"):
        load_caption_dataset(tmp_path / "nope" / "metadata.jsonl")


# ------------------------------------------------------------------ training side


def test_explode_captions(folder):
    meta = _jsonl(
        folder / "metadata.jsonl",
        [{"file_name": "a.png", "captions": ["1.", "2."]}, {"file_name": "b.png", "caption": "3."}],
    )
    ds, _ = load_caption_file(meta)
    flat = explode_captions(ds)
    assert flat.num_rows == 3 and "captions" not in flat.column_names
    assert list(zip(flat["image_id"], flat["caption"])) == [("a.png", "1."), ("a.png", "2."), ("b.png", "3.")]
    assert flat["image"][0] == flat["image"][1] == ds["image"][0]


def test_collator_padding_eos_labels_and_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    caps = ["a red circle.", "a small green triangle on a blue square left of a purple circle."]
    ids0 = tok(caps[0], add_special_tokens=False)["input_ids"]
    long_ids = tok(caps[1], add_special_tokens=False)["input_ids"]
    max_len = len(ids0) + 2
    assert len(long_ids) + 1 > max_len
    collator = CaptionCollator(tok, max_caption_length=max_len)
    feats = [{"caption": c, "image_embeds": [float(i)] * 5} for i, c in enumerate(caps)]
    batch = collator(feats)
    assert batch["input_ids"].shape == (2, max_len) and batch["image_embeds"].shape == (2, 5)
    assert batch["image_embeds"].dtype == torch.float32
    # row 0: caption as-is (no leading space) + eos, then padding masked in labels
    n0 = len(ids0) + 1
    assert batch["input_ids"][0, :n0].tolist() == ids0 + [eos]
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (max_len - n0)
    assert batch["labels"][0, :n0].tolist() == ids0 + [eos] and (batch["labels"][0, n0:] == -100).all()
    # row 1: truncated to max_len - 1 tokens + eos
    assert batch["input_ids"][1].tolist() == long_ids[: max_len - 1] + [eos]
    assert batch["labels"][1].tolist() == long_ids[: max_len - 1] + [eos]
    assert collator.num_truncated == 1
    assert count_truncated_captions(caps, tok, max_len) == 1
    assert count_truncated_captions(caps, tok, len(long_ids) + 1) == 0
    # dynamic padding: a batch of short captions is shorter
    short = collator([{"caption": "a.", "image_embeds": [0.0] * 5}])
    assert short["input_ids"].shape[1] == len(tok("a.", add_special_tokens=False)["input_ids"]) + 1


def test_collator_pixel_values_and_errors(tiny_tokenizer, folder):
    collator = CaptionCollator(tiny_tokenizer, max_caption_length=20)
    batch = collator(
        [
            {"caption": "a.", "pixel_values": torch.zeros(3, 4, 4)},
            {"caption": "b.", "pixel_values": torch.ones(3, 4, 4)},
        ]
    )
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and "image_embeds" not in batch
    with pytest.raises(ValueError, match="non-empty"):
        collator([{"caption": "  ", "image_embeds": [0.0]}])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(ValueError, match="different shapes"):
        collator([{"caption": "a.", "image_embeds": [0.0, 1.0]}, {"caption": "b.", "image_embeds": [0.0]}])

    class FakeProcessor:
        def __call__(self, images, return_tensors):
            return {
                "pixel_values": torch.stack(
                    [torch.tensor(list(im.getpixel((0, 0))), dtype=torch.float32) for im in images]
                )
            }

    with_images = CaptionCollator(tiny_tokenizer, 20, image_processor=FakeProcessor())
    out = with_images([{"caption": "a.", "image": str(folder / "a.png")}])
    assert out["pixel_values"].tolist() == [[200.0, 10.0, 10.0]]
    with pytest.raises(ImageLoadError, match=r"nope\.png"):
        with_images([{"caption": "a.", "image": str(folder / "nope.png")}])


def test_collator_needs_eos_and_sane_length(tiny_tokenizer):
    with pytest.raises(ValueError, match="max_caption_length"):
        CaptionCollator(tiny_tokenizer, max_caption_length=1)

    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="no eos token"):
        CaptionCollator(NoEos())


def test_end_to_end_exploded_data_through_collator(folder, tiny_tokenizer):
    meta = _jsonl(
        folder / "metadata.jsonl", [{"file_name": "a.png", "captions": ["a red circle.", "a cat."]}]
    )
    ds, report = load_caption_file(meta)
    flat = explode_captions(ds).add_column("image_embeds", [[1.0, 2.0]] * 2)
    report.truncated_captions = count_truncated_captions(flat, tiny_tokenizer, 4)
    report.max_caption_length = 4
    batch = CaptionCollator(tiny_tokenizer, 4)([flat[0], flat[1]])
    assert batch["image_embeds"].tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert "truncated to 4 tokens" in report.summary() and report.truncated_captions >= 1


def test_local_parquet_folder_through_load_dataset(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4), (9, 9, 9))] * 2, "caption": ["a.", "b."]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000.parquet"))
    out, report = load_caption_dataset(tmp_path / "pq", split="train", cache_dir=str(tmp_path / "cache"))
    assert out["image_id"] == ["0", "1"] and out["captions"] == [["a."], ["b."]]
    assert isinstance(out.features["image"], datasets.Image) and out.features["image"].decode is False
    assert load_example_image(out[0]["image"]).getpixel((1, 1)) == (9, 9, 9)
    assert report.num_images == 2


def test_explode_keeps_features_and_respects_selection(tmp_path):
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (2, 2), (i, i, i)) for i in range(3)],
            "caption": [["a.", "b."], ["c."], ["d.", "e.", "f."]],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}
        ),
    )
    out, _ = load_hf_caption_dataset("mem", dataset=ds)
    picked = out.select([2, 0])  # an indices mapping, not a copy
    flat = explode_captions(picked)
    assert flat["image_id"] == ["2", "2", "2", "0", "0"] and flat["caption"] == ["d.", "e.", "f.", "a.", "b."]
    assert isinstance(flat.features["image"], datasets.Image) and flat.features["image"].decode is False
    assert load_example_image(flat[3]["image"]).getpixel((0, 0)) == (0, 0, 0)
    assert load_example_image(flat[0]["image"]).getpixel((0, 0)) == (2, 2, 2)
    with pytest.raises(ValueError, match="'captions' column"):
        explode_captions(flat)


def test_collator_keeps_every_tower_input_siglip2(tmp_path):
    """A tower trained from pixels gets every tensor its processor returns: SigLIP2's patches with their
    pixel_attention_mask and spatial_shapes (dropping them changes the tower's features)."""
    from conftest import build_tiny_tokenizer, tiny_text_config
    from transformers import AutoConfig, Siglip2ImageProcessorPil

    from modeling_clipcap import ClipCapConfig, ClipCapForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    image_processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    paths = []
    for i, size in enumerate([(40, 30), (20, 60)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", size, (200, 20 + 100 * i, 20)).save(paths[-1])
    rows = [{"caption": "a red square.", "image": str(p)} for p in paths]
    batch = CaptionCollator(tokenizer, 16, image_processor=image_processor)(rows)
    assert {"pixel_values", "pixel_attention_mask", "spatial_shapes"} <= set(batch)
    assert batch["spatial_shapes"].tolist() == [[3, 4], [6, 2]]

    tower = AutoConfig.for_model(
        "siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_patches=16, patch_size=8,
    )  # fmt: skip
    config = ClipCapConfig(vision_config=tower, text_config=tiny_text_config(len(tokenizer)), prefix_length=3)
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config).eval()
    with torch.no_grad():
        loss = model(**batch).loss
        direct = image_processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        expected = model(**direct, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss  # fmt: skip
        unmasked = model(
            pixel_values=batch["pixel_values"], pixel_attention_mask=torch.ones_like(batch["pixel_attention_mask"]),
            spatial_shapes=batch["spatial_shapes"], input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"], labels=batch["labels"],
        ).loss  # fmt: skip
    assert torch.equal(loss, expected)
    assert not torch.allclose(loss, unmasked)
