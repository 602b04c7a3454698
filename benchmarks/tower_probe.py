"""Does a frozen image tower separate shape from colour, and bind them to the right object? Probes on the synthetic
shapes (issues 16 and 26).

ClipCap can only name what its frozen tower separates. This probe asks it directly: for each tower folder
(``training/pretrain_clip.py`` output, or any tower ``from_vision_text_pretrained`` accepts), encode the
one-object images of the synthetic data set, train one linear classifier per attribute (colour, shape, size) on
the tower's pooled embedding of ``train`` images, and measure it on the one-object images of ``test_novel``,
whose colour/shape pairs never occur in training. A tower whose shape direction does not depend on the colour
keeps its shape accuracy on the novel pairs; one that learnt "red circle" and "red square" as wholes does not.

    python benchmarks/tower_probe.py /tmp/clipcap-synthetic-towers/towers/* \\
        --data_dir /tmp/clipcap-synthetic-towers/data

Binding and relations (two-object images; trained on ``train``, measured on ``test``):

* ``where``: which object is left (or above)? The probe names that object's colour and shape.
* ``binding``: which colour goes with which shape? The probe names the colour of the object whose shape comes
  first alphabetically (images of two different shapes), e.g. "circle:red" for a red circle and a blue square.
* ARO-style swap scores (``caption_rewrites.binding_scores``): how often the tower ranks a held-out image's true
  caption above its own versions with the objects' attributes swapped, the objects swapped, or the relation
  inverted; ``aro`` is the mean of the first two (a tower that reads captions as bags of words scores 0.5). These
  need the text side: a tower folder with ``text_tower/`` (what ``pretrain_clip.py`` saves with the ``clip``
  objective), else the scores ``pretrain_clip.py --eval_file`` recorded in ``pretrain_results.json``.

Prints a table (train and novel accuracy per attribute, the binding probes and scores) and writes
``benchmarks/results/tower_probe.json``. Features are standardised with the training statistics; each probe is
full-batch Adam on the cross-entropy (seeded: the same towers give the same numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, print_table, write_json  # noqa: E402

ATTRIBUTES = ("color", "shape", "size")


def one_object_rows(split_dir: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The one-object rows of a split's ``metadata.jsonl`` (the first ``limit`` of them when given)."""
    metadata = split_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise SystemExit(f"{metadata} does not exist: pass --data_dir, a synthetic_data.py output folder.")
    rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("num_objects") == 1][:limit]


def two_object_rows(split_dir: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The two-object rows of a split's ``metadata.jsonl`` (the first ``limit`` of them when given)."""
    rows = [
        json.loads(line) for line in (split_dir / "metadata.jsonl").read_text().splitlines() if line.strip()
    ]
    return [r for r in rows if r.get("num_objects") == 2][:limit]


def where_label(row: dict[str, Any]) -> str:
    """The colour and shape of the object left of (or above) the other."""
    first = row["relation"] in ("left of", "above")  # the first listed object is the left / upper one
    obj = row["objects"][0 if first else 1]
    return f"{obj['color']} {obj['shape']}"


def binding_label(row: dict[str, Any]) -> str | None:
    """``shape:colour`` of the object whose shape comes first alphabetically; ``None`` for two equal shapes."""
    a, b = row["objects"]
    if a["shape"] == b["shape"]:
        return None
    obj = min((a, b), key=lambda o: o["shape"])
    return f"{obj['shape']}:{obj['color']}"


def load_tower(tower_dir: Path) -> tuple[Any, Any, Any]:
    """``(tower, its config, its image processor)`` from a tower folder."""
    from transformers import AutoConfig, AutoImageProcessor

    from modeling_clipcap.towers import load_pretrained_tower, vision_tower_config

    tower = load_pretrained_tower(str(tower_dir)).eval()
    config = vision_tower_config(AutoConfig.from_pretrained(str(tower_dir)))
    return tower, config, AutoImageProcessor.from_pretrained(str(tower_dir))


@torch.no_grad()
def pooled_features(
    loaded: tuple[Any, Any, Any],
    split_dir: Path,
    rows: list[dict[str, Any]],
    batch_size: int,
) -> torch.Tensor:
    """(N, D) pooled image embeddings of ``rows``' images (the tower's own image processor; a CLIP ViT's are its
    joint-space ``image_embeds``)."""
    from modeling_clipcap.image_io import load_image
    from modeling_clipcap.towers import image_features

    tower, config, processor = loaded
    out = []
    for start in range(0, len(rows), batch_size):
        images = [load_image(split_dir / r["file_name"]) for r in rows[start : start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        features = image_features(tower, config, pixels)
        pooled = features.pooler_output
        out.append(pooled if pooled is not None else features.last_hidden_state.mean(dim=1))
    return torch.cat(out).float()


def probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, classes: int
) -> tuple[float, float]:
    """Train a linear classifier on (N, D) features; returns (train accuracy, test accuracy)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        train_acc = (linear(train_x).argmax(1) == train_y).float().mean().item()
        test_acc = (linear(test_x).argmax(1) == test_y).float().mean().item()
    return round(train_acc, 3), round(test_acc, 3)


def probe_tower(tower_dir: Path, data_dir: Path, train_images: int, batch_size: int) -> dict[str, Any]:
    train_rows = one_object_rows(data_dir / "train", train_images)
    novel_rows = one_object_rows(data_dir / "test_novel")
    loaded = load_tower(tower_dir)
    train_x = pooled_features(loaded, data_dir / "train", train_rows, batch_size)
    novel_x = pooled_features(loaded, data_dir / "test_novel", novel_rows, batch_size)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, novel_x = (train_x - mean) / std, (novel_x - mean) / std
    record: dict[str, Any] = {
        "tower": tower_dir.name,
        "train_images": len(train_rows),
        "novel_images": len(novel_rows),
    }
    for attribute in ATTRIBUTES:
        labels = sorted({r["objects"][0][attribute] for r in train_rows})
        index = {label: i for i, label in enumerate(labels)}
        train_y = torch.tensor([index[r["objects"][0][attribute]] for r in train_rows])
        novel_y = torch.tensor([index[r["objects"][0][attribute]] for r in novel_rows])
        record[f"{attribute} train"], record[f"{attribute} novel"] = probe(
            train_x, train_y, novel_x, novel_y, len(labels)
        )
    record.update(two_object_probes(loaded, data_dir, train_images, batch_size))
    summary = tower_dir / "pretrain_results.json"
    if summary.is_file():
        record["pretraining"] = json.loads(summary.read_text())
    scores = swap_scores(tower_dir, data_dir)
    if scores is None and isinstance(record.get("pretraining", {}).get("binding"), dict):
        scores = record["pretraining"]["binding"]
    for key in ("aro", "swap_attributes", "swap_objects", "swap_relation"):
        record[key] = None if scores is None else scores.get(key)
    return record


def two_object_probes(
    loaded: tuple[Any, Any, Any], data_dir: Path, train_images: int, batch_size: int
) -> dict[str, Any]:
    """``where`` and ``binding`` probe accuracies (train, test) on two-object images."""
    train_rows = two_object_rows(data_dir / "train", train_images)
    test_rows = two_object_rows(data_dir / "test")
    train_x = pooled_features(loaded, data_dir / "train", train_rows, batch_size)
    test_x = pooled_features(loaded, data_dir / "test", test_rows, batch_size)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    out: dict[str, Any] = {}
    for name, label in (("where", where_label), ("binding", binding_label)):
        train_keep = [i for i, r in enumerate(train_rows) if label(r) is not None]
        test_keep = [
            i
            for i, r in enumerate(test_rows)
            if label(r) is not None and label(r) in {label(train_rows[j]) for j in train_keep}
        ]
        labels = sorted({label(train_rows[i]) for i in train_keep})
        index = {v: k for k, v in enumerate(labels)}
        out[f"{name} train"], out[f"{name} test"] = probe(
            train_x[train_keep],
            torch.tensor([index[label(train_rows[i])] for i in train_keep]),
            test_x[test_keep],
            torch.tensor([index[label(test_rows[i])] for i in test_keep]),
            len(labels),
        )
    return out


def swap_scores(tower_dir: Path, data_dir: Path) -> dict[str, Any] | None:
    """``caption_rewrites.binding_scores`` of the tower and its saved text side (``retrieval.load_towers``) on
    ``test``'s two-object images (their first captions); ``None`` when the folder has no text side."""
    from modeling_clipcap.caption_rewrites import binding_scores
    from modeling_clipcap.retrieval import load_towers

    towers = load_towers(tower_dir)
    if not towers.has_text:
        return None
    rows = two_object_rows(data_dir / "test")
    images = torch.from_numpy(towers.encode_images([data_dir / "test" / r["file_name"] for r in rows]))
    return binding_scores(
        images,
        [r["captions"][0] for r in rows],
        lambda texts: torch.from_numpy(towers.encode_texts(texts)),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("towers", nargs="+", type=Path, help="tower folders")
    p.add_argument(
        "--data_dir", type=Path, required=True, help="the synthetic data set (train/, test_novel/)"
    )
    p.add_argument("--train_images", type=int, default=4000, help="one-object training images probed")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    towers = [t for t in args.towers if (t / "config.json").is_file()]
    if not towers:
        raise SystemExit(f"none of {[str(t) for t in args.towers]} is a tower folder (with config.json).")
    records = [probe_tower(t, args.data_dir, args.train_images, args.batch_size) for t in towers]
    columns = ["tower"] + [f"{a} {s}" for a in ATTRIBUTES for s in ("train", "novel")]
    columns += ["where test", "binding test", "aro", "swap_attributes", "swap_objects", "swap_relation"]
    print_table(
        records,
        columns,
        title="Linear probes on frozen towers (one-object: train -> test_novel; two-object where/binding: "
        "train -> test) and ARO-style swap scores (test two-object captions)",
    )
    write_json("tower_probe", {"data_dir": str(args.data_dir), "towers": records}, RESULTS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
