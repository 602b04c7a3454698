"""Caption datastores for retrieval-augmented captioning (SmallCap-style), and ``clipcap index``.

A datastore is a folder of captions with their embeddings in the joint image-text space of a pair of towers
(a full CLIP / SigLIP checkpoint, or a folder written by ``training/pretrain_clip.py``), plus a faiss index::

    DATASTORE/captions.parquet   key (the image id a caption belongs to, "" for unpaired text), caption,
                                 embedding (fixed_size_list<float32>[P], L2-normalised)
    DATASTORE/index.faiss        faiss index over the embeddings (inner product = cosine similarity)
    DATASTORE/datastore.json     {"format", "modality", "towers", "fingerprint", "dim", "size", "index"}

``modality`` is ``"text"`` (captions embedded by the text tower; images query it by image-text similarity) or
``"image"`` (each caption stored with its image's embedding, image-to-image retrieval: for towers without a text
tower). ``fingerprint`` is a SHA-256 of the side of the towers that embedded the store (config and weights): a
store is refused by towers with another fingerprint, since their embeddings live in another space.

Retrieval lives here and in the processor (``ClipCapProcessor(images=..., datastore=...)``), never in the saved
model: the model only reads the retrieved captions as a text prompt after its image prefix
(``ClipCapConfig.retrieval_k`` / ``retrieval_template``), so a model trained with one datastore captions with
another one.

    clipcap index --model demo_output/clip --data demo_output/data/corpus/datastore.txt --output_dir ds
    clipcap caption photos/ --model my-retrieval-model --datastore ds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATASTORE_FORMAT = 1
DATASTORE_FILE = "datastore.json"
CAPTIONS_FILE = "captions.parquet"
INDEX_FILE = "index.faiss"
DUAL_ENCODER_FILE = "dual_encoder.json"
INDEX_TYPES = ("flat", "ivf", "hnsw")

__all__ = [
    "Datastore",
    "DatastoreError",
    "Towers",
    "build_datastore",
    "load_towers",
    "read_caption_source",
    "retrieve_for_embeddings",
]


class DatastoreError(ValueError):
    """A datastore (or the towers asked to read it) is unusable; the message says why and what to do."""


def _require_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is in the retrieval extra
        raise ImportError(
            "retrieval needs faiss: pip install 'modeling_clipcap[retrieval]' (faiss-cpu)."
        ) from err
    return faiss


def _hash_module(hasher: Any, module: torch.nn.Module | None) -> None:
    from .embedding_cache import _hash_tensor

    if module is None:
        return
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # what the module computes, not where it was loaded from: "_name_or_path" (the path as given, relative or
        # absolute), the writing transformers version and the other private fields are left out
        fields = {
            key: value
            for key, value in config.to_dict().items()
            if not key.startswith("_") and key not in ("transformers_version", "name_or_path")
        }
        hasher.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(name.encode())
        _hash_tensor(hasher, tensor)


# ------------------------------------------------------------------------------------------------ towers


@dataclass
class Towers:
    """An image tower and (optionally) a text tower that embed into one joint space.

    ``kind``: ``"clip"`` (a full CLIP / SigLIP model: ``get_image_features`` / ``get_text_features``) or
    ``"dual_encoder"`` (a ``training/pretrain_clip.py`` folder: the tower, ``text_tower/`` and the image
    projection). Embeddings are L2-normalised float32 numpy arrays (N, P).
    """

    name: str
    kind: str
    model: Any  # the full model (clip) or the vision tower (dual_encoder)
    image_processor: Any
    text_model: Any = None
    tokenizer: Any = None
    image_projection: torch.Tensor | None = None  # (P, D) for a dual encoder's non-CLIP tower

    @property
    def has_text(self) -> bool:
        return self.text_model is not None

    def fingerprint(self, modality: str) -> str:
        """SHA-256 of what decides the ``modality`` (``"text"`` or ``"image"``) embeddings: config and weights."""
        hasher = hashlib.sha256(f"clipcap-datastore/{modality}".encode())
        if modality == "text":
            if not self.has_text:
                raise DatastoreError(
                    f"{self.name} has no text tower; build an image datastore (--modality image)."
                )
            _hash_module(hasher, self.text_model)
        else:
            _hash_module(hasher, self.model if self.kind == "dual_encoder" else self.model.vision_model)
            if self.image_projection is not None:
                hasher.update(self.image_projection.numpy().tobytes())
            if self.kind == "clip" and hasattr(self.model, "visual_projection"):
                _hash_module(hasher, self.model.visual_projection)
        return hasher.hexdigest()

    @torch.no_grad()
    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, show_progress: bool = False
    ) -> np.ndarray:
        """Captions -> (N, P) normalised text embeddings."""
        from tqdm.auto import tqdm

        if not self.has_text:
            raise DatastoreError(
                f"{self.name} has no text tower (no {DUAL_ENCODER_FILE} / not a full CLIP or SigLIP); use an image "
                "datastore (clipcap index --modality image)."
            )
        out = []
        steps = range(0, len(texts), batch_size)
        for start in tqdm(steps, desc="Embedding captions", unit="batch", disable=not show_progress):
            chunk = [str(t) for t in texts[start : start + batch_size]]
            if self.kind == "dual_encoder":
                features = self.text_model(**self._dual_text_inputs(chunk)).text_embeds
            else:
                siglip = "siglip" in self.model.config.model_type
                inputs = self.tokenizer(
                    chunk, padding="max_length" if siglip else True, truncation=True, return_tensors="pt"
                )
                features = self.model.get_text_features(**inputs)
                features = getattr(features, "pooler_output", features)
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).numpy())
        dim = self.dim
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def _dual_text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``<|startoftext|> caption <|endoftext|>`` padded with eos, as ``pretrain_clip.py`` trained the tower."""
        tok = self.tokenizer
        limit = self.text_model.config.max_position_embeddings
        ids = [tok(t, add_special_tokens=False)["input_ids"][: limit - 2] for t in texts]
        rows = [[tok.bos_token_id, *x, tok.eos_token_id] for x in ids]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """``pixel_values`` (B, 3, H, W) from :attr:`image_processor` -> (B, P) normalised image embeddings."""
        if self.kind == "dual_encoder":
            from .towers import image_features

            pooled = image_features(self.model, self.model.config, pixel_values).pooler_output
            features = pooled if self.image_projection is None else pooled @ self.image_projection.t()
        else:
            features = self.model.get_image_features(pixel_values=pixel_values)
            features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).numpy()

    def encode_images(
        self, images: Sequence[Any], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Images (PIL, or anything ``image_io.load_image`` reads) -> (N, P) normalised image embeddings."""
        from tqdm.auto import tqdm

        from .image_io import load_image

        out = []
        steps = range(0, len(images), batch_size)
        for start in tqdm(steps, desc="Embedding images", unit="batch", disable=not show_progress):
            chunk = [load_image(i) for i in images[start : start + batch_size]]
            pixels = self.image_processor(chunk, return_tensors="pt")["pixel_values"]
            out.append(self.encode_pixels(pixels))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        if self.image_projection is not None:
            return int(self.image_projection.shape[0])
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or getattr(config, "hidden_size", 0))


def load_towers(path: str | os.PathLike) -> Towers:
    """The image and text towers of ``path``: a folder of ``training/pretrain_clip.py`` (its ``dual_encoder.json``),
    or a full CLIP / SigLIP checkpoint (both towers; a local folder or a Hub id). A tower checkpoint alone gives
    :class:`Towers` without a text side (image datastores only)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    from .towers import default_image_processor, load_pretrained_tower, vision_tower_config

    name = str(path)
    local = Path(path)
    if (local / DUAL_ENCODER_FILE).is_file():
        record = json.loads((local / DUAL_ENCODER_FILE).read_text())
        from transformers import CLIPTextModelWithProjection

        tower = load_pretrained_tower(name).eval()
        projection = None
        if record.get("image_projection"):
            from safetensors.torch import load_file

            projection = load_file(str(local / record["image_projection"]))["weight"].float()
        text_dir = local / record["text_tower"]
        text = CLIPTextModelWithProjection.from_pretrained(str(text_dir)).eval()
        return Towers(
            name=name,
            kind="dual_encoder",
            model=tower,
            image_processor=AutoImageProcessor.from_pretrained(name),
            text_model=text,
            tokenizer=AutoTokenizer.from_pretrained(str(text_dir)),
            image_projection=projection,
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        raise DatastoreError(
            f"--model {name}: no towers found ({err}). Give a full CLIP / SigLIP checkpoint or a folder written by "
            "training/pretrain_clip.py."
        ) from None
    if config.model_type in ("clip", "siglip", "siglip2"):
        model = AutoModel.from_pretrained(name).eval()
        return Towers(
            name=name,
            kind="clip",
            model=model,
            image_processor=AutoImageProcessor.from_pretrained(name),
            text_model=model,
            tokenizer=AutoTokenizer.from_pretrained(name),
        )
    tower = load_pretrained_tower(name).eval()  # an image tower alone: image datastores only
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError:
        processor = default_image_processor(vision_tower_config(config))
    return Towers(name=name, kind="dual_encoder", model=tower, image_processor=processor)


# ------------------------------------------------------------------------------------------------ the datastore


def read_caption_source(
    source: str | os.PathLike, split: str | None = None, image_dir: str | None = None
) -> tuple[list[str], list[str], list[Any]]:
    """Captions to index: ``(keys, captions, images)``. A ``.txt`` file is one caption a line (no key, no image);
    anything ``data.load_caption_dataset`` reads (metadata.jsonl / CSV, Karpathy JSON, a ``datasets`` split) gives
    each caption its image's id as key and its image (for image datastores)."""
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DatastoreError(f"--data {source}: no such file.")
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [""] * len(captions), captions, [None] * len(captions)
    from .data import load_caption_dataset

    dataset, _ = load_caption_dataset(str(source), split, image_dir=image_dir)
    keys, captions, images = [], [], []
    for row in dataset:
        for caption in row["captions"]:
            keys.append(str(row["image_id"]))
            captions.append(caption)
            images.append(row["image"])
    return keys, captions, images


def _make_index(embeddings: np.ndarray, index_type: str) -> Any:
    """An inner-product faiss index over (N, P) normalised embeddings: ``flat`` (exact), ``ivf`` (sqrt(N) lists,
    trained on the data) or ``hnsw`` (32 links)."""
    faiss = _require_faiss()
    dim = embeddings.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        lists = max(1, int(np.sqrt(len(embeddings))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = max(1, lists // 8)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise DatastoreError(f"--index {index_type!r}: choose one of {', '.join(INDEX_TYPES)}.")
    index.add(embeddings)
    return index


def build_datastore(
    towers: Towers,
    captions: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    keys: Sequence[str] | None = None,
    images: Sequence[Any] | None = None,
    modality: str = "text",
    index_type: str = "flat",
    batch_size: int = 256,
    show_progress: bool = True,
) -> Datastore:
    """Embed ``captions`` (``modality="text"``) or their ``images`` (``"image"``) with ``towers`` and write a
    datastore to ``output_dir``; returns it loaded.

    Args:
        keys: per caption the id of the image it describes (``""`` for unpaired text): training leaves an image's
            own captions out of what it retrieves for it.
        index_type: ``"flat"`` (exact inner product, the default), ``"ivf"`` or ``"hnsw"`` (approximate).
    """
    from .shards import write_embedding_parquet

    if modality not in ("text", "image"):
        raise DatastoreError(f"--modality must be 'text' or 'image', got {modality!r}.")
    captions = [str(c).strip() for c in captions]
    if not captions or not any(captions):
        raise DatastoreError("no captions to index: the data is empty; give at least one caption.")
    keys = [str(k) for k in keys] if keys is not None else [""] * len(captions)
    if modality == "text":
        embeddings = towers.encode_texts(captions, batch_size=batch_size, show_progress=show_progress)
    else:
        if images is None or any(i is None for i in images):
            raise DatastoreError(
                "an image datastore needs an image for every caption (a captioned image set)."
            )
        embeddings = _encode_unique_images(towers, keys, images, show_progress)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa

    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.reshape(-1)), embeddings.shape[1]
            ),
        }
    )
    write_embedding_parquet(out / CAPTIONS_FILE, table)
    faiss = _require_faiss()
    faiss.write_index(_make_index(embeddings, index_type), str(out / INDEX_FILE))
    info = {
        "format": DATASTORE_FORMAT,
        "modality": modality,
        "towers": os.path.abspath(towers.name) if Path(towers.name).exists() else towers.name,
        "fingerprint": towers.fingerprint(modality),
        "dim": int(embeddings.shape[1]),
        "size": len(captions),
        "index": index_type,
    }
    (out / DATASTORE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return Datastore.load(out, towers=towers)


def _encode_unique_images(
    towers: Towers, keys: Sequence[str], images: Sequence[Any], show: bool
) -> np.ndarray:
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key or f"#{i}", i)
    order = list(first.values())
    unique = towers.encode_images([images[i] for i in order], show_progress=show)
    row = {key: n for n, key in enumerate(first)}
    return unique[[row[key or f"#{i}"] for i, key in enumerate(keys)]]


class Datastore:
    """A loaded datastore: :meth:`search` by embeddings, :meth:`retrieve` by images (its towers embed them)."""

    def __init__(self, path: Path, info: dict[str, Any], keys: list[str], captions: list[str], index: Any):
        self.path, self.info, self.keys, self.captions, self.index = path, info, keys, captions, index
        self.towers: Towers | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def load(cls, path: str | os.PathLike, towers: Towers | None = None) -> Datastore:
        """Read a datastore folder; with ``towers`` (needed by :meth:`retrieve`), refuse one another tower built.

        ``towers`` default: the checkpoint named in ``datastore.json`` (loaded when :meth:`retrieve` first needs it).
        """
        import pyarrow.parquet as pq

        root = Path(path)
        if not (root / DATASTORE_FILE).is_file():
            raise DatastoreError(
                f"--datastore {path}: not a datastore (no {DATASTORE_FILE}); build one with clipcap index --model "
                "TOWERS --data CAPTIONS --output_dir DIR."
            )
        info = json.loads((root / DATASTORE_FILE).read_text())
        if info.get("format") != DATASTORE_FORMAT:
            raise DatastoreError(
                f"--datastore {path}: format {info.get('format')} is not {DATASTORE_FORMAT}."
            )
        if not info.get("size"):
            raise DatastoreError(f"--datastore {path} is empty (0 captions); index at least one caption.")
        table = pq.read_table(root / CAPTIONS_FILE, columns=["key", "caption"])
        index = _require_faiss().read_index(str(root / INDEX_FILE))
        if index.ntotal != table.num_rows or index.ntotal != info["size"]:
            raise DatastoreError(
                f"--datastore {path}: the index holds {index.ntotal} vectors but {table.num_rows} captions are "
                "stored; rebuild it with clipcap index."
            )
        store = cls(root, info, table["key"].to_pylist(), table["caption"].to_pylist(), index)
        if towers is not None:
            store.attach(towers)
        return store

    def attach(self, towers: Towers) -> None:
        """Use ``towers`` to embed queries; refuses towers other than those that built the store."""
        modality = self.info["modality"]
        if towers.fingerprint(modality) != self.info["fingerprint"]:
            raise DatastoreError(
                f"datastore {self.path} was built with the {modality} tower of {self.info['towers']} (fingerprint "
                f"{self.info['fingerprint'][:12]}), but the towers given ({towers.name}) are different "
                f"({towers.fingerprint(modality)[:12]}): their embeddings are in another space. Rebuild the "
                f"datastore with clipcap index --model {towers.name}, or use the towers it was built with."
            )
        self.towers = towers

    def _check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DatastoreError(f"retrieval k must be a positive integer, got {k!r}.")
        if k > len(self):
            raise DatastoreError(
                f"retrieval k={k} is larger than the datastore {self.path} ({len(self)} captions); index more "
                "captions or lower retrieval_k."
            )

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude_keys: Sequence[str] | None = None,
        exclude_captions: Sequence[str] | None = None,
    ) -> list[list[str]]:
        """The ``k`` captions nearest each query (Q, P) (normalised embeddings), best first.

        ``exclude_keys``: per query an image id whose own captions are left out (training: SmallCap never shows
        an image its own captions); ``""`` / None excludes nothing. ``exclude_captions``: per query a caption
        text left out wherever it is stored (text-only training: the caption being learnt).
        """
        self._check_k(k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.info["dim"]:
            raise DatastoreError(
                f"queries of shape {tuple(queries.shape)} do not match the datastore's {self.info['dim']}-wide "
                "embeddings."
            )
        results: list[list[str]] = [[] for _ in range(len(queries))]
        pending = list(range(len(queries)))
        excluding = exclude_keys is not None or exclude_captions is not None
        depth = min(len(self), k + (16 if excluding else 0))
        while pending:
            _, ids = self.index.search(queries[pending], depth)
            still = []
            for row, query in enumerate(pending):
                own = exclude_keys[query] if exclude_keys is not None else ""
                text = exclude_captions[query] if exclude_captions is not None else None
                found = [
                    self.captions[i]
                    for i in ids[row]
                    if i >= 0 and not (own and self.keys[i] == own) and self.captions[i] != text
                ]
                if len(found) >= k:
                    results[query] = found[:k]
                elif depth >= len(self):
                    raise DatastoreError(
                        f"only {len(found)} captions of datastore {self.path} remain for image {own!r} after "
                        f"leaving out its own; lower retrieval_k below {k} or index more captions."
                    )
                else:
                    still.append(query)
            pending, depth = still, min(len(self), depth * 2)
        return results

    def _require_towers(self) -> Towers:
        if self.towers is None:
            self.attach(load_towers(self.info["towers"]))
        return self.towers

    def retrieve(self, images: Sequence[Any], k: int) -> list[list[str]]:
        """Captions for ``images`` (PIL images or files): the ``k`` nearest each image's embedding, best first.

        Called by ``ClipCapProcessor(images=..., datastore=...)``.
        """
        self._check_k(k)
        return self.search(self._require_towers().encode_images(list(images)), k)

    def retrieve_pixels(self, pixel_values: torch.Tensor, k: int) -> list[list[str]]:
        """As :meth:`retrieve`, for ``pixel_values`` (B, 3, H, W) already made by the towers' image processor."""
        self._check_k(k)
        return self.search(self._require_towers().encode_pixels(pixel_values), k)


def retrieve_for_embeddings(
    datastore: Datastore, embeddings: np.ndarray, k: int, keys: Sequence[str] | None = None
) -> list[list[str]]:
    """Training's retrieval: per image (its (N, P) query embeddings) the ``k`` nearest captions, leaving out the
    captions whose key is the image's own ``keys[i]``."""
    return datastore.search(embeddings, k, exclude_keys=list(keys) if keys is not None else None)


# ------------------------------------------------------------------------------------------------ clipcap index


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``clipcap index``."""
    from .cli import add_bool_argument

    parser.add_argument(
        "--model",
        required=True,
        help="the towers: a full CLIP / SigLIP checkpoint, or a training/pretrain_clip.py folder",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="captions: a .txt file (one a line), metadata.jsonl / CSV, Karpathy JSON or a datasets split",
    )
    parser.add_argument("--split", default=None, help="split of --data (Karpathy JSON, datasets)")
    parser.add_argument("--image_dir", default=None, help="folder the file names of --data are relative to")
    parser.add_argument("--output_dir", required=True, help="the datastore folder to write")
    parser.add_argument(
        "--modality",
        default="text",
        choices=["text", "image"],
        help="text: captions embedded by the text tower; image: each caption with its image's embedding",
    )
    parser.add_argument("--index", default="flat", choices=INDEX_TYPES, help="faiss index (flat: exact)")
    parser.add_argument("--batch_size", type=int, default=256, help="captions per text tower batch")
    add_bool_argument(parser, "progress", default=True, help="progress bars")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``clipcap index``; 0 on success, 2 with one ``error:`` line for bad input."""
    from .data import CaptionDataError

    try:
        towers = load_towers(args.model)
        keys, captions, images = read_caption_source(args.data, args.split, args.image_dir)
        store = build_datastore(
            towers,
            captions,
            args.output_dir,
            keys=keys,
            images=images if args.modality == "image" else None,
            modality=args.modality,
            index_type=args.index,
            batch_size=args.batch_size,
            show_progress=args.progress,
        )
    except (DatastoreError, CaptionDataError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"indexed {len(store)} captions ({store.info['modality']}, {store.info['index']}) -> {args.output_dir}"
    )
    return 0


def retrieve_for_training(
    datastore: Datastore,
    images: Sequence[Any],
    image_ids: Sequence[str],
    k: int,
    template: str,
    *,
    show_progress: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """Training's retrieval (SmallCap): per image the ``k`` captions nearest its embedding, leaving out the image's
    own captions (datastore rows whose key is its ``image_ids[i]``); returns ``(prompts, retrieved)`` per image,
    the prompt made by ``processing_clipcap.retrieval_prompt`` with ``template``."""
    from .processing_clipcap import retrieval_prompt

    towers = datastore._require_towers()
    queries = towers.encode_images(list(images), show_progress=show_progress)
    retrieved = datastore.search(queries, k, exclude_keys=[str(i) for i in image_ids])
    return [retrieval_prompt(captions, template) for captions in retrieved], retrieved
