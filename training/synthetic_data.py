"""A deterministic synthetic image-captioning data set ("shapes"), generated from a seed with PIL.

Every image (default 64x64 RGB) shows one or two objects on a light gray background. An object
is one of 3 shapes (circle, square, triangle) x 6 colours (red, green, blue, yellow, purple,
orange) x 2 sizes (small, large). Two objects are in one of 4 spatial relations to each other
("left of", "right of", "above", "below"), placed so that the relation is unambiguous: the
objects' boxes do not overlap along the relation's axis (at least ``gap`` pixels apart) and
their centres differ by at most a few pixels along the other axis.

Each image has paraphrased reference captions, always lower case and ending with ".":

* one object (5 references): "a large red circle.", "there is a big red circle.",
  "a red circle that is large.", "a picture of a large red circle.", "one large red circle."
* two objects (4 references): "a small blue square left of a large green triangle.",
  "a large green triangle right of a small blue square.", "there is a small blue square left of
  a large green triangle.", "a picture of a small blue square left of a large green triangle."

Splits: ``train``, ``validation`` and ``test`` are drawn from the same distribution and never
contain the held-out colour/shape combinations in :data:`NOVEL_COMBINATIONS`; every image of
``test_novel`` contains at least one object with a held-out combination (the analogue of nocaps'
out-of-domain split). Every colour and every shape still occurs in training, only these pairs
do not.

Determinism: image ``i`` of split ``s`` is drawn from its own ``random.Random`` seeded with
``(seed, s, i)``, so the same seed gives byte-identical files whatever the split sizes (the first
``n`` images of a split do not depend on how many follow) and whatever order they are made in.

On disk (:func:`write_to_disk`), readable by ``modeling_clipcap.data``::

    OUT/train/train_000000.png ...        one folder of PNGs per split
    OUT/train/metadata.jsonl              {"file_name", "captions", "num_objects", "objects", "relation", "novel"}
    OUT/dataset_karpathy.json             Karpathy-style JSON over all splits
                                          (split names "train", "val", "test", "test_novel")
    OUT/synthetic_info.json               generator settings (seed, sizes, vocabulary, held-out pairs)
    OUT/corpus/captions.txt               unpaired text: every phrasing of every one- and two-object scene,
                                          the held-out pairs included (:func:`write_text_corpus`)
    OUT/corpus/datastore.txt              one caption per scene (the first phrasing): a retrieval datastore
    OUT/corpus/datastore_style2.txt       the same scenes in a second phrasing style (:func:`make_captions_style2`)

Command line::

    python training/synthetic_data.py --output_dir data/shapes --train_size 20000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

try:  # progress bars are optional for library use
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (140, 55, 175),
    "orange": (245, 135, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
#: object side length as a fraction of the image side
SIZE_FRACTION: dict[str, float] = {"small": 0.22, "large": 0.40}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
SIZE_SYNONYM: dict[str, str] = {"small": "little", "large": "big"}

#: (colour, shape) pairs that never occur in train/validation/test; every ``test_novel`` image has one.
NOVEL_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("purple", "square")}
)
SEEN_COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLORS for s in SHAPES if (c, s) not in NOVEL_COMBINATIONS
)

SPLITS: tuple[str, ...] = ("train", "validation", "test", "test_novel")
DEFAULT_SIZES: dict[str, int] = {"train": 20000, "validation": 500, "test": 1000, "test_novel": 500}
#: split name used in the Karpathy-style JSON
KARPATHY_SPLIT: dict[str, str] = {
    "train": "train",
    "validation": "val",
    "test": "test",
    "test_novel": "test_novel",
}

_MARGIN = 2  # pixels kept free at the image border
_GAP = 4  # minimum pixels between two objects along the relation's axis
_OFF_AXIS_JITTER = 3  # maximum centre offset across the relation's axis


def describe(obj: Mapping[str, Any]) -> str:
    """``"large red circle"`` for one object record."""
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def make_captions(objects: list[dict[str, Any]], relation: str) -> list[str]:
    """Paraphrased reference captions: 5 for one object, 4 for two (``objects[0] relation objects[1]``)."""
    if len(objects) == 1:
        o = objects[0]
        return [
            f"a {describe(o)}.",
            f"there is a {SIZE_SYNONYM[o['size']]} {o['color']} {o['shape']}.",
            f"a {o['color']} {o['shape']} that is {o['size']}.",
            f"a picture of a {describe(o)}.",
            f"one {describe(o)}.",
        ]
    a, b = objects
    return [
        f"a {describe(a)} {relation} a {describe(b)}.",
        f"a {describe(b)} {INVERSE_RELATION[relation]} a {describe(a)}.",
        f"there is a {describe(a)} {relation} a {describe(b)}.",
        f"a picture of a {describe(a)} {relation} a {describe(b)}.",
    ]


def _object_side(size: str, image_size: int) -> int:
    return max(3, round(SIZE_FRACTION[size] * image_size))


def _place_pair(
    rng: random.Random, side_a: int, side_b: int, relation: str, image_size: int
) -> tuple[list[int], list[int]]:
    """Top-left corners ``[x, y]`` of objects a and b such that ``a <relation> b`` is unambiguous."""
    # along the axis: `first` is the object with the smaller coordinate (left / top)
    a_first = relation in ("left of", "above")
    s_first, s_second = (side_a, side_b) if a_first else (side_b, side_a)
    hi_first = image_size - _MARGIN - s_first - _GAP - s_second
    if hi_first < _MARGIN:
        raise ValueError(
            f"image_size={image_size} is too small for two objects of sides {side_a} and {side_b}."
        )
    p_first = rng.randint(_MARGIN, hi_first)
    p_second = rng.randint(p_first + s_first + _GAP, image_size - _MARGIN - s_second)
    # across the axis: centres nearly aligned
    c_lo = _MARGIN + max(side_a, side_b) / 2
    c_hi = image_size - _MARGIN - max(side_a, side_b) / 2
    centre = rng.uniform(c_lo, c_hi)
    offsets = [rng.randint(-_OFF_AXIS_JITTER, _OFF_AXIS_JITTER) for _ in range(2)]
    cross = []
    for side, off in zip((side_a, side_b), offsets):
        q = round(centre + off - side / 2)
        cross.append(min(max(q, _MARGIN), image_size - _MARGIN - side))
    p_a, p_b = (p_first, p_second) if a_first else (p_second, p_first)
    if relation in ("left of", "right of"):
        return [p_a, cross[0]], [p_b, cross[1]]
    return [cross[0], p_a], [cross[1], p_b]


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int, fill: tuple[int, int, int]
) -> None:
    x1, y1 = x + side - 1, y + side - 1
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=fill)
    elif shape == "square":
        inset = round(side * 0.06)  # a square of equal box looks much bigger than a circle
        draw.rectangle([x + inset, y + inset, x1 - inset, y1 - inset], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + (side - 1) / 2, y), (x, y1), (x1, y1)], fill=fill)
    else:  # pragma: no cover
        raise ValueError(f"unknown shape {shape!r}")


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def generate_example(split: str, index: int, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
    """One record of split ``split``; depends only on ``(seed, split, index, image_size)``.

    Returns:
        ``{"image_id": "train_000007", "file_name": "train_000007.png", "image": PIL RGB
        (image_size, image_size), "captions": list[str], "num_objects": 1 | 2, "objects":
        [{"shape", "color", "size", "bbox": [x0, y0, x1, y1]}], "relation": str ("" for one
        object), "novel": bool}``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}.")
    rng = random.Random(f"clipcap-synthetic/{seed}/{split}/{index}/{image_size}")
    novel_split = split == "test_novel"
    num_objects = rng.choice((1, 2))
    novel_pairs = sorted(NOVEL_COMBINATIONS)
    all_pairs = list(SEEN_COMBINATIONS) + novel_pairs
    objects: list[dict[str, Any]] = []
    novel_slot = rng.randrange(num_objects) if novel_split else -1
    while len(objects) < num_objects:
        pool = (
            novel_pairs if len(objects) == novel_slot else (all_pairs if novel_split else SEEN_COMBINATIONS)
        )
        color, shape = rng.choice(pool)
        obj = {"shape": shape, "color": color, "size": rng.choice(SIZES)}
        if objects and describe(obj) == describe(objects[0]):
            continue  # two identical objects would make the caption meaningless
        objects.append(obj)
    relation = rng.choice(RELATIONS) if num_objects == 2 else ""

    sides = [_object_side(o["size"], image_size) for o in objects]
    if num_objects == 1:
        corners = [[rng.randint(_MARGIN, image_size - _MARGIN - sides[0]) for _ in range(2)]]
    else:
        corners = list(_place_pair(rng, sides[0], sides[1], relation, image_size))
    gray = rng.randint(215, 250)
    image = Image.new("RGB", (image_size, image_size), (gray, gray, gray))
    draw = ImageDraw.Draw(image)
    for obj, (x, y), side in zip(objects, corners, sides):
        _draw(draw, obj["shape"], x, y, side, _jitter(rng, COLORS[obj["color"]]))
        obj["bbox"] = [x, y, x + side - 1, y + side - 1]
    image_id = f"{split}_{index:06d}"
    return {
        "image_id": image_id,
        "file_name": f"{image_id}.png",
        "image": image,
        "captions": make_captions(objects, relation),
        "num_objects": num_objects,
        "objects": objects,
        "relation": relation,
        "novel": any((o["color"], o["shape"]) in NOVEL_COMBINATIONS for o in objects),
    }


def _progress(iterable: Iterable, total: int, desc: str, show: bool) -> Iterable:
    if show and tqdm is not None:
        return tqdm(iterable, total=total, desc=desc, unit="img", dynamic_ncols=True)
    return iterable


def generate_split(
    name: str, n: int, seed: int = 0, image_size: int = 64, show_progress: bool = False
) -> list[dict[str, Any]]:
    """``n`` records of split ``name`` (see :func:`generate_example`), in index order."""
    if n < 0:
        raise ValueError(f"split size must be >= 0, got {n} for {name!r}.")
    indices = _progress(range(n), n, f"generating {name}", show_progress)
    return [generate_example(name, i, seed=seed, image_size=image_size) for i in indices]


def _features():
    import datasets

    obj = {
        "shape": datasets.Value("string"),
        "color": datasets.Value("string"),
        "size": datasets.Value("string"),
        "bbox": datasets.List(datasets.Value("int32")),
    }
    return datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "captions": datasets.List(datasets.Value("string")),
            "num_objects": datasets.Value("int32"),
            "objects": datasets.List(obj),
            "relation": datasets.Value("string"),
            "novel": datasets.Value("bool"),
        }
    )


def _resolve_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    resolved = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(resolved) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {SPLITS}.")
    return {name: int(resolved[name]) for name in SPLITS if name in resolved}


def build_dataset_dict(
    sizes: Mapping[str, int] | None = None, seed: int = 0, image_size: int = 64, show_progress: bool = False
):
    """A ``datasets.DatasetDict`` with one ``Dataset`` per split.

    Columns: ``image_id`` (str), ``image`` (``datasets.Image``), ``captions`` (list[str]),
    ``num_objects`` (int), ``objects`` (list of ``{"shape", "color", "size", "bbox"}``),
    ``relation`` (str, ``""`` for one object), ``novel`` (bool).
    """
    import datasets

    features = _features()
    out = {}
    for name, n in _resolve_sizes(sizes).items():
        records = generate_split(name, n, seed=seed, image_size=image_size, show_progress=show_progress)
        columns = {key: [r[key] for r in records] for key in features}
        out[name] = datasets.Dataset.from_dict(columns, features=features, split=name)
    return datasets.DatasetDict(out)


def write_to_disk(
    out_dir: str | os.PathLike,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    image_size: int = 64,
    show_progress: bool = True,
    compress_level: int = 1,
) -> dict[str, Path]:
    """Write the splits as image folders with ``metadata.jsonl``, plus a Karpathy-style JSON.

    Args:
        out_dir: the output folder (created; existing files of the same names are overwritten).
        sizes: images per split, e.g. ``{"train": 20000, "test": 1000}`` (default :data:`DEFAULT_SIZES`).
        seed: the generator seed; the same seed gives byte-identical files.
        image_size: the image side in pixels.
        compress_level: PNG zlib level (1 is fast; output is deterministic for any level).

    Returns:
        ``{"karpathy": path, "info": path, "<split>": path to its metadata.jsonl, ...}``.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    resolved = _resolve_sizes(sizes)
    paths: dict[str, Path] = {}
    karpathy_images: list[dict[str, Any]] = []
    next_id = 0
    for name, n in resolved.items():
        split_dir = root / name
        split_dir.mkdir(parents=True, exist_ok=True)
        meta_path = split_dir / "metadata.jsonl"
        tmp_path = meta_path.with_suffix(".jsonl.tmp")
        with open(tmp_path, "w", encoding="utf-8", newline="\n") as meta:
            for i in _progress(range(n), n, f"writing {name}", show_progress):
                rec = generate_example(name, i, seed=seed, image_size=image_size)
                rec["image"].save(split_dir / rec["file_name"], format="PNG", compress_level=compress_level)
                row = {
                    "file_name": rec["file_name"],
                    "captions": rec["captions"],
                    "num_objects": rec["num_objects"],
                    "objects": rec["objects"],
                    "relation": rec["relation"],
                    "novel": rec["novel"],
                }
                meta.write(json.dumps(row, ensure_ascii=False) + "\n")
                karpathy_images.append(
                    {
                        "filepath": name,
                        "filename": rec["file_name"],
                        "imgid": next_id,
                        "cocoid": next_id,
                        "image_id": rec["image_id"],
                        "split": KARPATHY_SPLIT[name],
                        "sentences": [
                            {
                                "raw": c,
                                "tokens": c.rstrip(".").split(),
                                "imgid": next_id,
                                "sentid": next_id * 8 + k,
                            }
                            for k, c in enumerate(rec["captions"])
                        ],
                        "num_objects": rec["num_objects"],
                        "novel": rec["novel"],
                    }
                )
                next_id += 1
        os.replace(tmp_path, meta_path)
        paths[name] = meta_path
    karpathy_path = root / "dataset_karpathy.json"
    karpathy_path.write_text(
        json.dumps({"dataset": "clipcap-synthetic-shapes", "images": karpathy_images}) + "\n"
    )
    info = {
        "generator": "training/synthetic_data.py",
        "seed": seed,
        "image_size": image_size,
        "sizes": resolved,
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes_vocabulary": list(SIZES),
        "relations": list(RELATIONS),
        "novel_combinations": [list(p) for p in sorted(NOVEL_COMBINATIONS)],
        "karpathy_splits": KARPATHY_SPLIT,
    }
    info_path = root / "synthetic_info.json"
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    paths["karpathy"] = karpathy_path
    paths["info"] = info_path
    return paths


def caption_corpus() -> list[str]:
    """Every sentence pattern the generator can produce, once per object description (for
    training a tokenizer on the vocabulary without generating images)."""
    corpus: list[str] = []
    objects = [{"shape": s, "color": c, "size": z} for c in COLORS for s in SHAPES for z in SIZES]
    for o in objects:
        corpus.extend(make_captions([o], ""))
    for rel in RELATIONS:
        corpus.extend(make_captions([objects[0], objects[-1]], rel))
    return corpus


def make_captions_style2(objects: list[dict[str, Any]], relation: str) -> list[str]:
    """A second phrasing style, never used for the paired splits' references: attribute lists after the noun
    (``"red circle, large."``; two objects: ``"red circle, large, left of blue square, small."`` and the inverse
    relation). The datastore-swap experiment retrieves from a corpus in this style and scores against it."""

    def noun(o: Mapping[str, Any]) -> str:
        return f"{o['color']} {o['shape']}, {o['size']}"

    if len(objects) == 1:
        return [f"{noun(objects[0])}."]
    a, b = objects
    return [f"{noun(a)}, {relation} {noun(b)}.", f"{noun(b)}, {INVERSE_RELATION[relation]} {noun(a)}."]


def scene_descriptions() -> list[tuple[list[dict[str, Any]], str]]:
    """Every scene the generator can describe, the held-out colour/shape pairs included: each of the 36 objects
    alone, and every ordered pair of two different objects in every relation (36 * 35 * 4 = 5,040)."""
    objects = [{"shape": s, "color": c, "size": z} for c in COLORS for s in SHAPES for z in SIZES]
    scenes: list[tuple[list[dict[str, Any]], str]] = [([o], "") for o in objects]
    for a in objects:
        for b in objects:
            if a is not b:
                scenes += [([a, b], rel) for rel in RELATIONS]
    return scenes


def write_text_corpus(out_dir: str | os.PathLike) -> dict[str, Path]:
    """The unpaired text of the "text is plentiful, pairs are not" setting, over every scene of
    :func:`scene_descriptions` (held-out pairs included, although no image ever shows them in training):

    * ``captions.txt``: every reference phrasing of every scene (20,340 lines): text for a language model;
    * ``datastore.txt``: one caption per scene, the first phrasing (5,076 lines): a retrieval datastore;
    * ``datastore_style2.txt``: one caption per scene in :func:`make_captions_style2`'s style (5,076 lines).

    One caption a line, the order fixed. Returns ``{"captions", "datastore", "datastore_style2"}`` paths.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    scenes = scene_descriptions()
    texts = {
        "captions": [c for objects, rel in scenes for c in make_captions(objects, rel)],
        "datastore": [make_captions(objects, rel)[0] for objects, rel in scenes],
        "datastore_style2": [make_captions_style2(objects, rel)[0] for objects, rel in scenes],
    }
    paths = {}
    for name, lines in texts.items():
        paths[name] = root / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def build_arg_parser() -> argparse.ArgumentParser:
    from modeling_clipcap.cli import add_bool_argument  # the one flag style (only the command line needs it)

    parser = argparse.ArgumentParser(description="Generate the synthetic shapes captioning data set.")
    parser.add_argument("--output_dir", required=True, help="folder to write the splits into")
    parser.add_argument("--train_size", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--validation_size", type=int, default=DEFAULT_SIZES["validation"])
    parser.add_argument("--test_size", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument("--test_novel_size", type=int, default=DEFAULT_SIZES["test_novel"])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    add_bool_argument(parser, "progress", default=True, help="progress bars")
    add_bool_argument(
        parser, "text_corpus", default=True, help="also write OUT/corpus/ (unpaired captions of every scene)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    sizes = {
        "train": args.train_size,
        "validation": args.validation_size,
        "test": args.test_size,
        "test_novel": args.test_novel_size,
    }
    paths = write_to_disk(
        args.output_dir,
        sizes=sizes,
        seed=args.seed,
        image_size=args.image_size,
        show_progress=args.progress,
    )
    if args.text_corpus:
        corpus = write_text_corpus(Path(args.output_dir) / "corpus")
        print(f"wrote the text corpus to {corpus['captions'].parent}")
    total = sum(sizes.values())
    print(f"wrote {total} images to {args.output_dir} (Karpathy JSON: {paths['karpathy']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
