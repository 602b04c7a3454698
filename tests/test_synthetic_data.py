"""Tests for training/synthetic_data.py: determinism, captions, relations, held-out pairs, disk formats."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_module():
    spec = importlib.util.spec_from_file_location("synthetic_data", REPO / "training" / "synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_data"] = module
    spec.loader.exec_module(module)
    return module


syn = _load_module()


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_vocabulary_and_held_out_pairs():
    assert len(syn.SHAPES) == 3 and len(syn.COLORS) == 6 and len(syn.SIZES) == 2 and len(syn.RELATIONS) == 4
    assert len(syn.SEEN_COMBINATIONS) + len(syn.NOVEL_COMBINATIONS) == 18
    # every colour and every shape still occurs in training, only the pairs are held out
    assert {c for c, _ in syn.SEEN_COMBINATIONS} == set(syn.COLORS)
    assert {s for _, s in syn.SEEN_COMBINATIONS} == set(syn.SHAPES)


def test_generate_split_is_deterministic_and_prefix_stable():
    a = syn.generate_split("train", 12, seed=3)
    b = syn.generate_split("train", 20, seed=3)[:12]
    c = syn.generate_split("train", 12, seed=4)
    for x, y in zip(a, b):
        assert x["captions"] == y["captions"] and x["objects"] == y["objects"]
        assert x["image"].tobytes() == y["image"].tobytes()
    assert [x["captions"] for x in a] != [x["captions"] for x in c]
    assert [x["image_id"] for x in a] == [f"train_{i:06d}" for i in range(12)]


def test_records_and_captions():
    records = syn.generate_split("test", 200, seed=0)
    counts = {1: 0, 2: 0}
    for r in records:
        assert r["image"].mode == "RGB" and r["image"].size == (64, 64)
        counts[r["num_objects"]] += 1
        assert len(r["objects"]) == r["num_objects"]
        assert len(r["captions"]) == (5 if r["num_objects"] == 1 else 4)
        assert len(set(r["captions"])) == len(r["captions"])
        for cap in r["captions"]:
            assert cap.endswith(".") and cap == cap.lower() and "  " not in cap
        first = r["objects"][0]
        assert f"{first['color']} {first['shape']}" in r["captions"][0]
        if r["num_objects"] == 2:
            assert r["relation"] in syn.RELATIONS and r["relation"] in r["captions"][0]
            assert r["captions"][1].startswith(
                f"a {syn.describe(r['objects'][1])} {syn.INVERSE_RELATION[r['relation']]}"
            )
        else:
            assert r["relation"] == ""
            assert r["captions"][0] == f"a {syn.describe(first)}."
    assert counts[1] > 60 and counts[2] > 60


def _mask(image, rgb, tol=40):
    arr = np.asarray(image).astype(int)
    return np.abs(arr - np.array(rgb)).sum(-1) < tol


def test_drawn_objects_match_attributes_and_relations_are_unambiguous():
    for r in syn.generate_split("train", 150, seed=1):
        boxes = [o["bbox"] for o in r["objects"]]
        for o, (x0, y0, x1, y1) in zip(r["objects"], boxes):
            side = x1 - x0 + 1
            assert side == syn._object_side(o["size"], 64) and y1 - y0 + 1 == side
            assert 0 <= x0 and x1 < 64 and 0 <= y0 and y1 < 64
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2 + (side // 4 if o["shape"] == "triangle" else 0)
            pixel = np.asarray(r["image"])[cy, cx].astype(int)
            assert np.abs(pixel - np.array(syn.COLORS[o["color"]])).max() <= 12, (r["image_id"], o)
        if r["num_objects"] == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            rel = r["relation"]
            if rel == "left of":
                assert ax1 + syn._GAP < bx0 + 1
            elif rel == "right of":
                assert bx1 + syn._GAP < ax0 + 1
            elif rel == "above":
                assert ay1 + syn._GAP < by0 + 1
            else:
                assert by1 + syn._GAP < ay0 + 1
            # centres nearly aligned across the axis, so the relation is the dominant offset
            across = (
                abs((ay0 + ay1) - (by0 + by1)) / 2
                if rel in ("left of", "right of")
                else abs((ax0 + ax1) - (bx0 + bx1)) / 2
            )
            along = (
                abs((ax0 + ax1) - (bx0 + bx1)) / 2
                if rel in ("left of", "right of")
                else abs((ay0 + ay1) - (by0 + by1)) / 2
            )
            assert across <= 2 * syn._OFF_AXIS_JITTER + 1 and along > 2 * across


def test_novel_pairs_only_in_test_novel():
    for split in ("train", "validation", "test"):
        for r in syn.generate_split(split, 150, seed=0):
            assert not r["novel"]
            assert all((o["color"], o["shape"]) not in syn.NOVEL_COMBINATIONS for o in r["objects"])
    novel = syn.generate_split("test_novel", 100, seed=0)
    assert all(r["novel"] for r in novel)
    assert all(any((o["color"], o["shape"]) in syn.NOVEL_COMBINATIONS for o in r["objects"]) for r in novel)


def test_build_dataset_dict():
    import datasets

    dd = syn.build_dataset_dict({"train": 6, "test_novel": 3}, seed=0)
    assert set(dd) == {"train", "test_novel"} and dd["train"].num_rows == 6
    assert isinstance(dd["train"].features["image"], datasets.Image)
    row = dd["test_novel"][0]
    assert row["image"].size == (64, 64) and row["novel"] is True
    assert row["num_objects"] == len(row["objects"]) and isinstance(row["captions"], list)
    expected = syn.generate_example("test_novel", 0, seed=0)
    assert row["captions"] == expected["captions"]
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(expected["image"]))
    with pytest.raises(ValueError, match="unknown split"):
        syn.build_dataset_dict({"training": 3})


def test_write_to_disk_is_byte_identical_and_readable(tmp_path):
    from modeling_clipcap.data import load_caption_dataset

    sizes = {"train": 8, "validation": 3, "test": 4, "test_novel": 3}
    syn.write_to_disk(tmp_path / "a", sizes=sizes, seed=7, show_progress=False)
    syn.write_to_disk(tmp_path / "b", sizes=sizes, seed=7, show_progress=False)
    digest_a = _tree_digest(tmp_path / "a")
    assert digest_a == _tree_digest(tmp_path / "b")
    syn.write_to_disk(tmp_path / "c", sizes=sizes, seed=8, show_progress=False)
    assert digest_a != _tree_digest(tmp_path / "c")
    assert len([k for k in digest_a if k.endswith(".png")]) == 18

    lines = (tmp_path / "a" / "train" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["file_name"] == "train_000000.png"
    karpathy = json.loads((tmp_path / "a" / "dataset_karpathy.json").read_text())
    assert {im["split"] for im in karpathy["images"]} == {"train", "val", "test", "test_novel"}

    ds, report = load_caption_dataset(tmp_path / "a" / "test" / "metadata.jsonl")
    assert ds.num_rows == 4 and report.num_images == 4
    kds, kreport = load_caption_dataset(tmp_path / "a" / "dataset_karpathy.json", split="test")
    assert sorted(map(sorted, kds["captions"])) == sorted(map(sorted, ds["captions"]))
    novel, _ = load_caption_dataset(tmp_path / "a" / "dataset_karpathy.json", split="test_novel")
    assert novel.num_rows == 3


def test_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(REPO / "training" / "synthetic_data.py"), "--output_dir", str(out), "--train_size", "5",
         "--validation_size", "2", "--test_size", "2", "--test_novel_size", "2", "--seed", "1", "--no_progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 11 images" in proc.stdout
    assert len(list((out / "train").glob("*.png"))) == 5
    info = json.loads((out / "synthetic_info.json").read_text())
    assert info["seed"] == 1 and info["sizes"]["train"] == 5


def test_generation_speed():
    import time

    start = time.perf_counter()
    syn.generate_split("train", 1000, seed=0)
    elapsed = time.perf_counter() - start
    # 20k images must take well under a minute: 1000 in < 2.5 s leaves ample margin on a slow core
    assert elapsed < 2.5, f"1000 images took {elapsed:.2f}s"


def test_dataset_dict_feeds_the_data_readers():
    from modeling_clipcap.data import explode_captions, load_hf_caption_dataset

    dd = syn.build_dataset_dict({"train": 4, "test": 2}, seed=0)
    ds, report = load_hf_caption_dataset("synthetic", "train", dataset=dd, caption_column="captions")
    assert ds.num_rows == 4 and report.num_captions == sum(len(c) for c in dd["train"]["captions"])
    assert explode_captions(ds).num_rows == report.num_captions
