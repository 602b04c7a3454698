"""Does a frozen image tower separate shape from colour? Linear probes on the synthetic shapes (issue 16).

ClipCap can only name what its frozen tower separates. This probe asks it directly: for each tower folder
(``training/pretrain_clip.py`` output, or any tower ``from_vision_text_pretrained`` accepts), encode the
one-object images of the synthetic data set, train one linear classifier per attribute (colour, shape, size) on
the tower's pooled embedding of ``train`` images, and measure it on the one-object images of ``test_novel``,
whose colour/shape pairs never occur in training. A tower whose shape direction does not depend on the colour
keeps its shape accuracy on the novel pairs; one that learnt "red circle" and "red square" as wholes does not.

    python benchmarks/tower_probe.py /tmp/clipcap-synthetic-towers/towers/* \\
        --data_dir /tmp/clipcap-synthetic-towers/data

Prints a table (train and novel accuracy per attribute) and writes ``benchmarks/results/tower_probe.json``.
Features are standardised with the training statistics; each probe is full-batch Adam on the cross-entropy
(seeded: the same towers give the same numbers).
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


def load_tower(tower_dir: Path) -> tuple[Any, Any, Any]:
    """``(tower, its config, its image processor)`` from a tower folder."""
    from transformers import AutoConfig, AutoImageProcessor

    from modeling_clipcap.towers import load_pretrained_tower, vision_tower_config

    tower = load_pretrained_tower(str(tower_dir)).eval()
    config = vision_tower_config(AutoConfig.from_pretrained(str(tower_dir)))
    return tower, config, AutoImageProcessor.from_pretrained(str(tower_dir))


@torch.no_grad()
def pooled_features(
    loaded: tuple[Any, Any, Any], split_dir: Path, rows: list[dict[str, Any]], batch_size: int
) -> torch.Tensor:
    """(N, D) pooled image embeddings of ``rows``' images (the tower's own image processor)."""
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
    summary = tower_dir / "pretrain_results.json"
    if summary.is_file():
        record["pretraining"] = json.loads(summary.read_text())
    return record


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
    print_table(
        records, columns, title="Linear probes on frozen towers: one-object images (train -> test_novel)"
    )
    write_json("tower_probe", {"data_dir": str(args.data_dir), "towers": records}, RESULTS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
