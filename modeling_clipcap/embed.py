"""``clipcap embed``: image embeddings of a sharded corpus, computed once, written as Parquet shards.

    accelerate launch -m modeling_clipcap.cli embed --model org/clipcap-cc --data 'cc/{00000..00331}.tar' \
        --output_dir cc-emb/
    accelerate launch training/train.py --config hub_configs/conceptual-mlp --train_file 'cc-emb/*.parquet' ...

``--model`` is a ClipCap model (its image tower and image processor are used) or an image-tower checkpoint
(CLIP, SigLIP, DINOv2, ...: the towers of :mod:`modeling_clipcap.towers`). Every input shard gives one output
shard ``<output_dir>/<shard name>.parquet`` with ``key``, ``caption`` and ``image_embeds`` (D float32: the
tower's image embedding, what ``mapping_input="pooled"`` consumes), plus ``patch_tokens`` (N x D_tokens) with
``--patch_tokens``. The shards are split over the processes the command is launched with (process ``r`` of
``P`` takes shards ``r, r + P, ...``); each output is written to a temporary name and renamed when complete, so
an interrupted run is resumed by running the same command again: finished shards are not redone.
Bad images are skipped and listed (``--on_bad_image skip``, the default here) in ``<name>.skipped.json``.
If any process fails, the command fails on every process (exit status 2) once the others have finished their
shards; ``embed_info.json`` (written last, by the main process) then says ``"complete": false`` with the
failures and the shards still missing, and the finished shards stay for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .image_io import BAD_IMAGE_POLICIES
from .shards import (
    embedding_table,
    expand_shards,
    iter_shard_rows,
    write_atomically,
    write_embedding_parquet,
)

__all__ = ["add_cli_arguments", "cli_main", "embed_shards", "load_image_encoder"]


class _TowerEncoder(torch.nn.Module):
    """A bare image tower behind the interface :func:`modeling_clipcap.embedding_cache.encode_images` uses
    (``vision_model``, ``get_image_embeddings``, ``config.image_embed_dim``)."""

    def __init__(self, tower: torch.nn.Module, vision_config: Any):
        from types import SimpleNamespace

        from .towers import image_embed_dim

        super().__init__()
        self.vision_model = tower
        self.vision_config = vision_config
        self.config = SimpleNamespace(
            image_embed_dim=image_embed_dim(vision_config, "pooled"),
            mapping_input="pooled",
            freeze_vision=True,
        )

    def get_image_embeddings(
        self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs: Any
    ) -> Any:
        """The tower's outputs: ``pooler_output`` (B, D), ``last_hidden_state`` (B, N, D_tokens), as
        ``ClipCapForConditionalGeneration.get_image_embeddings`` gives them (always as an output object)."""
        from .towers import image_features, tower_dtype

        return image_features(
            self.vision_model, self.vision_config, pixel_values.to(tower_dtype(self.vision_model)), **kwargs
        )


def load_image_encoder(model: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(encoder, image_processor, description)`` for ``--model``: a ClipCap model (its tower) or a tower checkpoint."""
    from transformers import AutoConfig, AutoImageProcessor

    from .towers import default_image_processor, load_pretrained_tower, vision_tower_config

    config = AutoConfig.from_pretrained(model)
    if config.model_type == "clipcap":
        from . import ClipCapForConditionalGeneration, ClipCapProcessor

        encoder = ClipCapForConditionalGeneration.from_pretrained(model)
        if encoder.vision_model is None:
            raise ValueError(
                f"--model {model}: this ClipCap model has no image tower (it takes image_embeds)."
            )
        image_processor = ClipCapProcessor.from_pretrained(model).image_processor
        tower_config = encoder.config.vision_config
    else:
        tower_config = vision_tower_config(config)
        encoder = _TowerEncoder(load_pretrained_tower(model), tower_config)
        try:
            image_processor = AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError):  # a tower checkpoint without a saved image processor
            image_processor = default_image_processor(tower_config)
    return encoder.eval(), image_processor, {"model": str(model), "tower": tower_config.model_type}


def _write_shard(target: Path, table: Any, skipped: list[list[str]]) -> None:
    skipped_json, sidecar = json.dumps(skipped), target.with_suffix(".skipped.json")
    write_atomically(sidecar, lambda path: path.write_text(skipped_json))
    try:
        write_embedding_parquet(target, table)  # the .parquet comes last
    except BaseException:
        sidecar.unlink(missing_ok=True)
        raise


def embed_shards(
    encoder: Any,
    image_processor: Any,
    data: str,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    patch_tokens: bool = False,
    on_bad_image: str = "skip",
    num_workers: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Encode this process's part of the shards of ``data`` (``shards[rank::world_size]``) into Parquet shards.

    Returns ``{"shards_written", "shards_skipped" (already complete), "images_encoded", "skipped"}`` for this
    process. Each shard is a :func:`modeling_clipcap.shards.embedding_table`: ``key``, ``caption``,
    ``image_embeds`` (D,) float32 per row, and ``patch_tokens`` (N, D_tokens) when asked.
    """
    from .embedding_cache import encode_images

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shards = expand_shards(data)
    names = [_output_name(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"{data}: two shards have the same file name; outputs are named after them.")
    report: dict[str, Any] = {"shards_written": 0, "shards_skipped": 0, "images_encoded": 0, "skipped": []}
    for shard, name in list(zip(shards, names))[rank::world_size]:
        target = output_dir / f"{name}.parquet"
        if target.is_file():
            report["shards_skipped"] += 1
            continue
        rows = [r for r in iter_shard_rows([shard]) if "image" in r]
        kwargs = dict(
            names=[f"{shard}::{r['key']}" for r in rows],
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            num_workers=num_workers,
            on_bad_image=on_bad_image,
            show_progress=show_progress,
            desc=f"Embedding {name}",
        )
        images = [r["image"] for r in rows]
        embeds, kept, skipped = encode_images(
            encoder, image_processor, images, mapping_input="pooled", **kwargs
        )
        embeddings = {"pooled": embeds}  # (M, D)
        if patch_tokens:  # a second pass over the good images for the token features (M, N, D_tokens)
            embeddings["tokens"], _, _ = encode_images(
                encoder,
                image_processor,
                [images[i] for i in kept],
                mapping_input="tokens",
                **kwargs | {"names": None},
            )
        table = embedding_table(
            [rows[i]["key"] for i in kept], embeddings, captions=[rows[i]["caption"] for i in kept]
        )
        _write_shard(target, table, [list(s) for s in skipped])
        report["shards_written"] += 1
        report["images_encoded"] += len(kept)
        report["skipped"] += [list(s) for s in skipped]
    return report


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clipcap embed``."""
    from .cli import add_bool_argument

    parser.add_argument(
        "--model", required=True, help="A ClipCap model or an image-tower checkpoint (folder or Hub id)."
    )
    parser.add_argument(
        "--data", required=True, help="Shards: 'shards/*.tar', 'cc-{00000..00331}.tar', Parquet..."
    )
    parser.add_argument("--output_dir", required=True, help="Where <shard>.parquet files are written.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per tower call.")
    parser.add_argument("--num_workers", type=int, default=0, help="Image decoding workers per process.")
    parser.add_argument("--on_bad_image", choices=BAD_IMAGE_POLICIES, default="skip")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    add_bool_argument(parser, "patch_tokens", help="Also store the tower's token features (a second pass)")
    add_bool_argument(
        parser, "progress", default=True, help="Progress bars (the first process of each machine)"
    )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``clipcap embed`` in this process (one of those ``accelerate launch`` / ``torchrun`` started)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    # Like Accelerator: ACCELERATE_USE_CPU (and a machine without accelerator) means CPU processes over gloo;
    # a bare PartialState() there leaves every launched process alone, each embedding every shard.
    state = PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise RuntimeError(
            f"clipcap embed was launched as {launched} processes but this one is alone (no process group): "
            "each would embed every shard. Launch it with `accelerate launch` (on CPUs: ACCELERATE_USE_CPU=true)."
        )
    start = time.time()
    described: dict[str, Any] = {"model": str(args.model)}
    try:
        encoder, image_processor, described = load_image_encoder(args.model)
        report = embed_shards(
            encoder.to(state.device),
            image_processor,
            args.data,
            args.output_dir,
            batch_size=args.batch_size,
            patch_tokens=args.patch_tokens,
            on_bad_image=args.on_bad_image,
            num_workers=args.num_workers,
            dtype=getattr(torch, args.dtype),
            device=state.device,
            rank=state.process_index,
            world_size=state.num_processes,
            show_progress=args.progress and state.is_local_main_process,
        )
        failure = None
    except Exception as err:  # every process reports, so one failing never leaves the others waiting
        report, failure = None, f"process {state.process_index}: {type(err).__name__}: {err}"
        if state.num_processes > 1:  # shown now, even if the others never reach the report below
            print(f"clipcap embed: {failure}", file=sys.stderr, flush=True)
    outcome = [{"report": report, "failure": failure}]
    reports = gather_object(outcome) if state.num_processes > 1 else outcome
    failures = [r["failure"] for r in reports if r["failure"]]
    if state.is_main_process:
        done = [r["report"] for r in reports if r["report"] is not None]
        summary = {
            **described,
            "data": args.data,
            "complete": not failures,  # every shard of --data has its .parquet
            "images_encoded_per_rank": [r["report"] and r["report"]["images_encoded"] for r in reports],
            "shards_written": sum(r["shards_written"] for r in done),
            "shards_already_done": sum(r["shards_skipped"] for r in done),
            "skipped": [s for r in done for s in r["skipped"]],
            "seconds": round(time.time() - start, 1),
        }
        if failures:
            summary |= {"failures": failures, "shards_missing": _missing_outputs(args.data, args.output_dir)}
        text = json.dumps(summary, indent=2)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(args.output_dir) / "embed_info.json", lambda path: path.write_text(text))
        if failures:
            print(
                "clipcap embed: error: " + "\n".join(failures) + f"\nShards finished so far are kept in "
                f"{args.output_dir}; run the same command again to do the rest.",
                file=sys.stderr,
            )
        else:
            print(
                json.dumps(
                    {k: v for k, v in summary.items() if k != "skipped"}
                    | {"skipped": len(summary["skipped"])}
                )
            )
    return 2 if failures else 0


def _missing_outputs(data: str, output_dir: str | os.PathLike) -> list[str] | None:
    """The shards of ``data`` without a ``.parquet`` in ``output_dir`` (None when ``data`` cannot be listed)."""
    try:
        shards = expand_shards(data)
    except Exception:  # the failure being reported may be this one
        return None
    return [s for s in shards if not (Path(output_dir) / f"{_output_name(s)}.parquet").is_file()]


def _output_name(shard: str) -> str:
    """The output stem of a shard path or URL: its file name without the extension."""
    return Path(shard.split("://")[-1]).name.rsplit(".", 1)[0]
