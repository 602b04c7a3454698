#!/usr/bin/env python
"""Pretrain an image tower contrastively on a captioned image folder (the demo's stand-in for OpenAI CLIP).

No pretrained encoder can be downloaded offline, so the demo trains its own: any image tower ClipCap supports
(``modeling_clipcap.towers.VISION_FAMILIES``: a CLIP ViT, a small ResNet or ConvNeXt, a DINOv2-style ViT, ...),
built from its transformers config through the Auto classes, against a small CLIP text tower, with one of two
objectives:

* ``clip``: one global embedding per image (the tower's pooled image embedding, projected) and per caption (the
  text tower's eos token, projected), L2-normalised; the symmetric cross-entropy over the batch's cosine
  similarities times a learned temperature (as ``CLIPModel(return_loss=True)``).
* ``filip``: token-wise late interaction (FILIP): every image token (patch, or CNN feature-map cell) and every
  caption token is projected and L2-normalised; an image-caption pair's image-to-text similarity is the mean over
  the image tokens of each one's best-matching caption token, its text-to-image similarity the mean over the
  caption's tokens of each one's best-matching image token (padding tokens are neither matched nor averaged).
  The same symmetric cross-entropy is taken over the two similarity matrices.

The trained tower alone is saved with ``save_pretrained`` (a ``CLIPVisionModelWithProjection`` for the CLIP ViT,
whose ``visual_projection`` is the image side of the joint space), with a ``CLIPImageProcessor`` for its image size
and the tokenizer, so ``training/train.py --vision_model_name_or_path OUT`` (``from_vision_text_pretrained``)
takes it as a frozen ClipCap encoder. The text tower and the other projections are training scaffolding and are
not saved.

    python training/pretrain_clip.py --train_file data/shapes/train/metadata.jsonl \
        --config hub_configs/clipcap-synthetic-tiny --tokenizer_name demo_output/tokenizer \
        --output_dir demo_output/clip --max_steps 600 [--objective filip] [--vision_config tower.json]

Text side: the captioning tokenizer (GPT-2 style, ``<|endoftext|>`` as bos = eos) gets an extra
``<|startoftext|>`` bos token, because the CLIP text tower pools at the *first* eos token: each caption
becomes ``<|startoftext|> caption <|endoftext|>`` padded with ``<|endoftext|>`` (masked out).

Images are decoded once into a uint8 tensor (N, 3, H, W) (the synthetic images are small: 20k 64x64
images take 245 MB) and normalised per batch with the image processor's mean and std; each step pairs
every image of the batch with one of its reference captions, drawn at random. A SigLIP2 (NaFlex) tower reads
patches instead: its own image processor (``towers.default_image_processor``, saved with the tower) turns each
image once into (num_patches, 3 * patch_size**2) patches with their ``pixel_attention_mask`` and
``spatial_shapes``, which reach the tower with every batch; FILIP then neither matches nor averages the padded
patch slots.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python training/pretrain_clip.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from modeling_clipcap.data import load_caption_dataset  # noqa: E402
from modeling_clipcap.image_io import load_image  # noqa: E402
from modeling_clipcap.presets import find_preset, read_preset  # noqa: E402
from modeling_clipcap.towers import (  # noqa: E402
    build_vision_tower,
    default_image_processor,
    image_embed_dim,
    image_features,
    vision_family,
)

BOS_TOKEN = "<|startoftext|>"
OBJECTIVES = ("clip", "filip")

#: defaults, overridden by the preset's ``clip_pretraining.json`` and then by the command line
DEFAULTS: dict[str, Any] = {
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
    },
    "objective": "clip",
    "projection_dim": 128,
    "image_size": 64,
    "batch_size": 256,
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 50,
    "max_steps": 600,
    "max_minutes": None,
    "seed": 0,
    "hard_negatives": [],
    "negatives_per_caption": 1,
    "flip": [],
}


def read_metadata(
    train_file: str | Path, image_dir: str | Path | None = None
) -> tuple[list[Path], list[list[str]]]:
    """Image paths and their reference captions from an image folder's ``metadata.jsonl`` (or the folder), read
    by the library's reader (``modeling_clipcap.data.load_caption_dataset``: captions cleaned, one entry per
    image, missing images named); paths are relative to ``image_dir`` (default: the metadata file's folder)."""
    if not Path(train_file).exists():  # a path that is not there is never a dataset name here
        raise FileNotFoundError(
            f"--train_file {train_file} does not exist; pass an image folder's metadata.jsonl."
        )
    images, _ = load_caption_dataset(train_file, image_dir=image_dir)
    if len(images) == 0:
        raise ValueError(f"{train_file} lists no images.")
    return [Path(path) for path in images["image"]], images["captions"]


def load_pixels(paths: list[Path], image_size: int, show_progress: bool = True) -> torch.Tensor:
    """Decode and resize images into a uint8 tensor (N, 3, image_size, image_size)."""
    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="reading images", unit="img", disable=not show_progress)):
        image = load_image(path)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size))
        out[i] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def load_patches(
    paths: list[Path], image_processor: Any, show_progress: bool = True
) -> dict[str, torch.Tensor]:
    """Decode images and run a patch-based (SigLIP2 NaFlex) image processor on them once: ``pixel_values``
    (N, num_patches, 3 * patch_size**2), ``pixel_attention_mask`` (N, num_patches) and ``spatial_shapes`` (N, 2)."""
    parts: list[dict[str, torch.Tensor]] = []
    chunk = 256
    for start in tqdm(
        range(0, len(paths), chunk), desc="reading images", unit="chunk", disable=not show_progress
    ):
        images = [load_image(path) for path in paths[start : start + chunk]]
        parts.append(dict(image_processor(images=images, return_tensors="pt")))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def normalize(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) the way CLIPImageProcessor does (rescale 1/255, normalise)."""
    x = pixels.float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------ the objectives


def filip_similarity(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    image_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP's token-wise late interaction between every image and every caption of a batch.

    Args:
        image_tokens: (B_img, N, D) image token embeddings (L2-normalised for FILIP).
        text_tokens: (B_txt, L, D) caption token embeddings (L2-normalised for FILIP).
        text_mask: (B_txt, L), 1 for a real token, 0 for padding (never matched, never averaged).
        image_mask: (B_img, N), 1 for a real image token, 0 for a padded one (SigLIP2's empty patch slots:
            never matched, never averaged); ``None``: every image token is real.

    Returns:
        ``(image_to_text, text_to_image)``, both (B_img, B_txt): for image i and caption j, the mean over i's
        real tokens of each one's best dot product with a real token of j; and the mean over j's real tokens of
        each one's best dot product with a real token of i.
    """
    if text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(
            f"text_mask has shape {tuple(text_mask.shape)}; expected {tuple(text_tokens.shape[:2])}."
        )
    if image_mask is None:
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
    if image_mask.shape != image_tokens.shape[:2]:
        raise ValueError(
            f"image_mask has shape {tuple(image_mask.shape)}; expected {tuple(image_tokens.shape[:2])}."
        )
    real = text_mask.bool()
    real_image = image_mask.bool()
    if not real.any(dim=1).all():
        raise ValueError("every caption needs at least one real (unmasked) token in text_mask.")
    if not real_image.any(dim=1).all():
        raise ValueError("every image needs at least one real (unmasked) token in image_mask.")
    sim = torch.einsum("ind,tld->itnl", image_tokens, text_tokens)  # (B_img, B_txt, N, L)
    best_text = sim.masked_fill(~real[None, :, None, :], float("-inf")).amax(dim=3)  # (B_img, B_txt, N)
    image_weights = real_image.to(sim.dtype)[:, None]  # (B_img, 1, N)
    image_to_text = (best_text * image_weights).sum(dim=2) / image_weights.sum(dim=2)
    # (B_img, B_txt, L): each caption token's best match among the real image tokens
    best_image = sim.masked_fill(~real_image[:, None, :, None], float("-inf")).amax(dim=2)
    weights = real.to(sim.dtype)[None]  # (1, B_txt, L)
    text_to_image = (best_image * weights).sum(dim=2) / weights.sum(dim=2)
    return image_to_text, text_to_image


def contrastive_loss(image_to_text: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over (B, B + M) logits whose first B columns hold the batch's captions, the
    matching pairs on the diagonal (rows: images): images classify their caption among all B + M columns with
    ``image_to_text``, captions their image with ``text_to_image``. The M further columns are hard negative
    captions (NegCLIP): they join every image's negatives, and have no image of their own to classify."""
    batch = image_to_text.shape[0]
    target = torch.arange(batch, device=image_to_text.device)
    image_loss = nn.functional.cross_entropy(image_to_text, target)
    text_loss = nn.functional.cross_entropy(text_to_image[:, :batch].t(), target)
    return (image_loss + text_loss) / 2


def text_attention_mask(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, L) ids padded with eos -> (B, L) mask: 1 up to and including the first eos, 0 on the padding."""
    is_eos = (input_ids == eos_token_id).long()
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).long()


class ContrastiveDualEncoder(nn.Module):
    """An image tower of any supported family and a CLIP text tower, projected into one joint space.

    The CLIP ViT keeps its own ``visual_projection`` (and, for FILIP, its ``post_layernorm``) as the image
    side, so the saved ``CLIPVisionModelWithProjection`` gives joint-space ``image_embeds``; other towers get a
    new linear projection of their pooled embedding (``clip``) or token features (``filip``).
    """

    def __init__(self, vision_config: Any, text_config: Any, projection_dim: int, objective: str) -> None:
        super().__init__()
        from transformers import CLIPTextModel

        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
        self.objective = objective
        self.vision_config = vision_config
        self.vision = build_vision_tower(vision_config)
        self.text = CLIPTextModel(text_config)
        if vision_config.model_type == "clip_vision_model":
            projection_dim = vision_config.projection_dim
            self.image_projection = None
        else:
            width = image_embed_dim(vision_config, "tokens" if objective == "filip" else "pooled")
            self.image_projection = nn.Linear(width, projection_dim, bias=False)
        self.text_projection = nn.Linear(text_config.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixel_values: torch.Tensor, **image_kwargs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) (SigLIP2: (B, N, 3 * p * p) patches with ``pixel_attention_mask`` and ``spatial_shapes`` in
        ``image_kwargs``) -> L2-normalised (B, D) (``clip``) or (B, N, D) (``filip``)."""
        out = image_features(self.vision, self.vision_config, pixel_values, **image_kwargs)
        if self.objective == "clip":
            x = out.pooler_output
            x = x if self.image_projection is None else self.image_projection(x)
        elif self.image_projection is None:  # CLIP ViT: its own final norm and projection on every token
            norm = next(m for n, m in self.vision.named_modules() if n.endswith("post_layernorm"))
            x = self.vision.visual_projection(norm(out.last_hidden_state))
        else:
            x = self.image_projection(out.last_hidden_state)
        return nn.functional.normalize(x, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> L2-normalised (B, D) (the eos token, ``clip``) or (B, L, D) (every token, ``filip``)."""
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        x = out.pooler_output if self.objective == "clip" else out.last_hidden_state
        return nn.functional.normalize(self.text_projection(x), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        **image_kwargs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled ``(image_to_text, text_to_image)`` logits, both (B_img, B_txt). ``image_kwargs``: SigLIP2's
        ``pixel_attention_mask`` (B_img, N) and ``spatial_shapes`` (B_img, 2)."""
        image = self.encode_image(pixel_values, **image_kwargs)
        text = self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale.exp()
        if self.objective == "clip":
            logits = scale * image @ text.t()
            return logits, logits
        image_mask = image_kwargs.get("pixel_attention_mask")  # padded patch slots are not image tokens
        image_to_text, text_to_image = filip_similarity(image, text, attention_mask, image_mask)
        return scale * image_to_text, scale * text_to_image


# ------------------------------------------------------------------------------------------------ building


def tower_config(vision_config: dict[str, Any] | Any) -> Any:
    """A tower config from a dict with ``model_type`` (no ``model_type``: a CLIP ViT, as older presets wrote it);
    a clear error for a family ClipCap does not support."""
    from transformers import AutoConfig, PreTrainedConfig

    if isinstance(vision_config, PreTrainedConfig):
        config = vision_config
    else:
        fields = {k: v for k, v in dict(vision_config).items() if k != "transformers_version"}
        config = AutoConfig.for_model(fields.pop("model_type", "clip_vision_model"), **fields)
    vision_family(config)
    return config


def build_text_side(
    tokenizer_name: str | Path, captions: list[list[str]], text_config: dict[str, Any] | None
) -> tuple[Any, Any, list[torch.Tensor]]:
    """The tokenizer (a ``<|startoftext|>`` bos added), a ``CLIPTextConfig`` sized for the captions, and per image
    its captions' token ids (n_captions, L), padded with eos."""
    from transformers import AutoTokenizer, CLIPTextConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_name))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_name} has no eos token.")
    tokenizer.add_special_tokens({"bos_token": BOS_TOKEN})
    tokenizer.pad_token = tokenizer.eos_token
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert bos_id != eos_id, "CLIP's text tower needs eos != bos (it pools at the first eos)"
    all_ids = [
        [bos_id, *tokenizer(c, add_special_tokens=False)["input_ids"], eos_id]
        for caps in captions
        for c in caps
    ]
    width = max(len(x) for x in all_ids)
    fields = dict(DEFAULTS["text_config"])
    fields.update(text_config or {})
    fields["max_position_embeddings"] = max(fields.get("max_position_embeddings", 0), width)
    fields.update(vocab_size=len(tokenizer), bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    caption_ids: list[torch.Tensor] = []
    cursor = 0
    for caps in captions:
        rows = all_ids[cursor : cursor + len(caps)]
        cursor += len(caps)
        caption_ids.append(torch.tensor([r + [eos_id] * (width - len(r)) for r in rows], dtype=torch.long))
    return tokenizer, CLIPTextConfig(**fields), caption_ids


FLIP_AXES = ("horizontal", "vertical")


def caption_views(
    captions: list[list[str]],
    flip: tuple[str, ...] = (),
    hard_negative_kinds: tuple[str, ...] = (),
    seed: int = 0,
) -> tuple[list[list[list[str]]], list[list[list[list[str]]]]]:
    """Per image, its captions under each view (view 0: the image as it is; then one per axis of ``flip``: the
    image flipped along it, captions mirrored by ``caption_rewrites.mirror_caption``; an empty list where some
    caption of the image cannot be mirrored safely, so that image is never flipped), and each caption's hard
    negatives (``caption_rewrites.hard_negatives``; attribute changes draw only words of the captions).

    Returns:
        ``(views, negatives)``: ``views[i][v]`` the captions of image i under view v; ``negatives[i][v][j]`` the
        negatives of caption j of that view.
    """
    from modeling_clipcap.caption_rewrites import hard_negatives, mirror_caption

    for axis in flip:
        if axis not in FLIP_AXES:
            raise ValueError(f"flip axis must be one of {FLIP_AXES}, got {axis!r}.")
    rng = random.Random(seed)
    vocabulary = {w.strip(".,;:!?").lower() for caps in captions for c in caps for w in c.split()}
    views: list[list[list[str]]] = []
    negatives: list[list[list[list[str]]]] = []
    for caps in captions:
        image_views = [list(caps)]
        for axis in flip:
            mirrored = [mirror_caption(c, axis) for c in caps]
            image_views.append([] if any(m is None for m in mirrored) else [str(m) for m in mirrored])
        views.append(image_views)
        negatives.append(
            [[hard_negatives(c, hard_negative_kinds, rng, vocabulary) for c in view] for view in image_views]
            if hard_negative_kinds
            else [[[] for _ in view] for view in image_views]
        )
    return views, negatives


def flip_pixels(pixels: torch.Tensor, axis: str) -> torch.Tensor:
    """(B, 3, H, W) images flipped along ``axis`` ("horizontal": left <-> right, "vertical": top <-> bottom)."""
    return pixels.flip(dims=[3] if axis == "horizontal" else [2])


def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then a cosine to 0 at ``max_steps``.

    After the warm-up this is transformers' ``get_scheduler("cosine", ...)`` exactly; during it, that one gives
    step ``k`` the factor ``k / warmup_steps`` (step 0 does not move), this one ``(k + 1) / warmup_steps``.
    Kept so that the demo's pretrained towers stay what docs/demo.md measured."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, warmup_steps: int, max_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases, norms, embeddings and the temperature) with warm-up + cosine."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    schedule = functools.partial(cosine_with_warmup, warmup_steps=warmup_steps, max_steps=max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def save_tower(model: ContrastiveDualEncoder, image_processor: Any, tokenizer: Any, out_dir: Path) -> None:
    """The trained tower alone (``save_pretrained``, safetensors), its image processor and the tokenizer; with the
    ``clip`` objective also the text side (:func:`save_text_side`), so the folder serves ``clipcap index``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.vision.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if model.objective == "clip":
        save_text_side(model, tokenizer, out_dir)


def save_text_side(model: ContrastiveDualEncoder, tokenizer: Any, out_dir: Path) -> None:
    """The joint space's other half, in the layout ``modeling_clipcap.retrieval.load_towers`` reads:
    ``text_tower/`` (a ``CLIPTextModelWithProjection`` and the text tokenizer, ``<|startoftext|>`` bos),
    ``image_projection.safetensors`` (``weight`` (P, D): pooled image embedding -> joint space; absent for a CLIP
    ViT, whose saved ``image_embeds`` are already projected) and ``dual_encoder.json`` naming them."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **(model.text.config.to_dict() | {"projection_dim": model.text_projection.out_features})
    )
    text = CLIPTextModelWithProjection(config)
    text.text_model.load_state_dict(model.text.state_dict())
    text.text_projection.load_state_dict(model.text_projection.state_dict())
    text.save_pretrained(out_dir / "text_tower")
    tokenizer.save_pretrained(out_dir / "text_tower")
    record: dict[str, Any] = {"text_tower": "text_tower", "image_projection": None}
    if model.image_projection is not None:
        weight = model.image_projection.weight.detach().contiguous()
        save_file({"weight": weight}, str(out_dir / "image_projection.safetensors"))
        record["image_projection"] = "image_projection.safetensors"
    record["logit_scale"] = float(model.logit_scale.detach().exp())
    (out_dir / "dual_encoder.json").write_text(json.dumps(record, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ training


def pretrain_tower(
    train_file: str | Path,
    output_dir: str | Path,
    vision_config: dict[str, Any] | Any,
    tokenizer_name: str | Path,
    text_config: dict[str, Any] | None = None,
    objective: str = "clip",
    projection_dim: int = 128,
    image_size: int | None = None,
    image_dir: str | Path | None = None,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    max_steps: int = 600,
    max_minutes: float | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    show_progress: bool = True,
    hard_negatives: tuple[str, ...] | list[str] = (),
    negatives_per_caption: int = 1,
    flip: tuple[str, ...] | list[str] = (),
    eval_file: str | Path | None = None,
) -> dict[str, Any]:
    """Train an image tower contrastively against a CLIP text tower and save the tower to ``output_dir``.

    Args:
        vision_config: the tower's config, or a dict of its fields with ``model_type`` (any family of
            ``towers.VISION_FAMILIES``; a CLIP ViT's ``projection_dim`` is then the joint embedding width).
        tokenizer_name: the captioning tokenizer (GPT-2 style); a ``<|startoftext|>`` bos is added.
        text_config: ``CLIPTextConfig`` fields (width, depth); vocabulary and special ids come from the tokenizer.
        objective: ``"clip"`` (global embeddings) or ``"filip"`` (token-wise late interaction).
        projection_dim: joint embedding width for towers other than CLIP.
        image_size: side of the square training images (default: the config's ``image_size``, else 64); a
            SigLIP2 tower's own image processor sizes its patches from ``patch_size`` and ``num_patches`` instead.
        max_steps: optimizer steps (the cosine schedule's length); ``max_minutes`` stops earlier if set.
        hard_negatives: kinds of hard negative captions (``caption_rewrites.NEGATIVE_KINDS``: swap_attributes,
            swap_objects, swap_relation, change_attribute); each step, every image's caption brings up to
            ``negatives_per_caption`` of its own (drawn among those that apply), and they join every image's
            negatives in the image-to-text half of the loss (:func:`contrastive_loss`). Empty: none.
        flip: relation-aware augmentation: for each axis ("horizontal", "vertical"), each image whose captions can
            all be mirrored (``caption_rewrites.mirror_caption``) is flipped along it with probability
            1 / (1 + len(flip)) per step, its captions (and their negatives) mirrored with it.
        eval_file: a held-out image folder's metadata.jsonl: after training, the binding scores
            (``caption_rewrites.binding_scores``, ``clip`` objective only) of its images' first captions go into the
            summary as ``binding``.

    Returns:
        A summary: steps, first and final loss (means of the first / last 20 steps, or of a quarter of the steps
        in shorter runs), in-batch image-to-text retrieval accuracy on as many last batches, seconds, parameters,
        and the output folder.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    start = time.time()
    paths, captions = read_metadata(train_file, image_dir)
    if max_train_samples is not None:
        paths, captions = paths[:max_train_samples], captions[:max_train_samples]
    if len(paths) < 2:
        raise ValueError("contrastive pretraining needs at least 2 images.")
    batch_size = min(batch_size, len(paths))
    # the PIL backend: needs no torchvision, and prints no notice about it
    from transformers import CLIPImageProcessorPil

    from modeling_clipcap.caption_rewrites import check_negative_kinds

    hard_negatives = check_negative_kinds(list(hard_negatives))
    flip = tuple(flip)
    if negatives_per_caption < 1:
        raise ValueError(f"negatives_per_caption must be >= 1, got {negatives_per_caption}.")
    config = tower_config(vision_config)
    views, negatives = caption_views(captions, flip, hard_negatives, seed)
    # one tokenized row per caption and negative of every view; rows[i][v][j] / negative_rows[i][v][j] index them
    texts: list[list[str]] = [
        [] for _ in captions
    ]  # per image, all its texts (build_text_side pads them to one width)
    rows: list[list[list[int]]] = []
    negative_rows: list[list[list[list[int]]]] = []
    for i, (image_views, image_negatives) in enumerate(zip(views, negatives)):
        rows.append([])
        negative_rows.append([])
        for view, view_negatives in zip(image_views, image_negatives):
            rows[i].append([len(texts[i]) + j for j in range(len(view))])
            texts[i].extend(view)
            negative_rows[i].append([])
            for caption_negatives in view_negatives:
                negative_rows[i][-1].append(
                    list(range(len(texts[i]), len(texts[i]) + len(caption_negatives)))
                )
                texts[i].extend(caption_negatives)
    tokenizer, text_cfg, caption_ids = build_text_side(tokenizer_name, texts, text_config)
    model = ContrastiveDualEncoder(config, text_cfg, projection_dim, objective)
    patches = vision_family(config).pixels == "patches"
    if patches and flip:
        raise ValueError(
            f"flip augmentation needs image pixels; the {config.model_type} tower reads patches."
        )
    flippable = [[v for v in range(1, len(image_views)) if image_views[v]] for image_views in views]
    if patches:  # SigLIP2: its own processor, run once per image (patches, their mask and the grid's shape)
        image_processor = default_image_processor(config)
        patch_inputs = load_patches(paths, image_processor, show_progress=show_progress)
    else:
        image_size = int(image_size or getattr(config, "image_size", None) or DEFAULTS["image_size"])
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        pixels = load_pixels(paths, image_size, show_progress=show_progress)
    optimizer, scheduler = make_optimizer(model, learning_rate, weight_decay, warmup_steps, max_steps)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    accuracies: list[float] = []
    deadline = start + max_minutes * 60 if max_minutes else None
    bar = tqdm(total=max_steps, desc=f"{objective} pretraining", unit="step", disable=not show_progress)
    while len(losses) < max_steps and not (deadline is not None and time.time() > deadline):
        if len(order) < batch_size:
            order = list(range(len(paths)))
            rng.shuffle(order)
        batch, order = order[:batch_size], order[batch_size:]
        # each image's view this step: 0 (as it is) or one of its flips, each with probability 1 / (1 + len(flip))
        chosen = [
            rng.choice([0, *flippable[i]])
            if flippable[i] and rng.random() < len(flip) / (1 + len(flip))
            else 0
            for i in batch
        ]
        if patches:
            image_inputs = {key: value[batch] for key, value in patch_inputs.items()}
        else:
            mean, std = image_processor.image_mean, image_processor.image_std
            batch_pixels = pixels[batch]
            for axis_index, axis in enumerate(flip, start=1):
                rows_flipped = [b for b, v in enumerate(chosen) if v == axis_index]
                if rows_flipped:
                    batch_pixels[rows_flipped] = flip_pixels(batch_pixels[rows_flipped], axis)
            image_inputs = {"pixel_values": normalize(batch_pixels, mean, std)}
        picked = [rng.randrange(len(rows[i][v])) for i, v in zip(batch, chosen)]
        text_rows = [caption_ids[i][rows[i][v][j]] for i, v, j in zip(batch, chosen, picked)]
        for i, v, j in zip(batch, chosen, picked):  # hard negatives of each image's caption join the columns
            own = negative_rows[i][v][j]
            for k in rng.sample(own, min(negatives_per_caption, len(own))):
                text_rows.append(caption_ids[i][k])
        input_ids = torch.stack(text_rows)
        image_to_text, text_to_image = model(
            input_ids=input_ids,
            attention_mask=text_attention_mask(input_ids, text_cfg.eos_token_id),
            **image_inputs,
        )
        loss = contrastive_loss(image_to_text, text_to_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        hits = (image_to_text.argmax(dim=1) == torch.arange(len(batch))).float().mean().item()
        losses.append(loss.item())
        accuracies.append(hits)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", i2t_acc=f"{hits:.2f}")
    bar.close()

    model.eval()
    out_dir = Path(output_dir)
    save_tower(model, image_processor, tokenizer, out_dir)
    binding = None
    if eval_file is not None and objective == "clip" and not patches:
        binding = evaluate_binding(model, image_processor, tokenizer, eval_file, image_size)
    window = max(1, min(20, len(losses) // 4))  # steps averaged for the first / final loss
    summary = {
        "tower": config.model_type,
        "objective": objective,
        "steps": len(losses),
        "train_images": len(paths),
        "batch_size": batch_size,
        "first_loss": float(np.mean(losses[:window])) if losses else None,
        "final_loss": float(np.mean(losses[-window:])) if losses else None,
        "final_in_batch_image_to_text_accuracy": float(np.mean(accuracies[-window:])) if accuracies else None,
        "hard_negatives": list(hard_negatives),
        "negatives_per_caption": negatives_per_caption if hard_negatives else 0,
        "flip": list(flip),
        "binding": binding,
        "seconds": round(time.time() - start, 1),
        "tower_parameters": sum(p.numel() for p in model.vision.parameters()),
        "output_dir": str(out_dir),
    }
    (out_dir / "pretrain_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def evaluate_binding(
    model: ContrastiveDualEncoder,
    image_processor: Any,
    tokenizer: Any,
    eval_file: str | Path,
    image_size: int,
    batch_size: int = 256,
) -> dict[str, Any]:
    """``caption_rewrites.binding_scores`` of the trained dual encoder (``clip`` objective) on a held-out image
    folder: every image's first caption against its swapped versions."""
    from modeling_clipcap.caption_rewrites import binding_scores

    paths, captions = read_metadata(eval_file)
    first = [caps[0] for caps in captions]
    pixels = load_pixels(paths, image_size, show_progress=False)
    mean, std = image_processor.image_mean, image_processor.image_std
    images = torch.cat(
        [
            model.encode_image(normalize(pixels[i : i + batch_size], mean, std))
            for i in range(0, len(paths), batch_size)
        ]
    )

    def encode_text(texts: list[str]) -> torch.Tensor:
        ids = [
            [
                tokenizer.bos_token_id,
                *tokenizer(t, add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id,
            ]
            for t in texts
        ]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [tokenizer.eos_token_id] * (width - len(x)) for x in ids])
        mask = text_attention_mask(input_ids, tokenizer.eos_token_id)
        return torch.cat(
            [
                model.encode_text(input_ids[i : i + batch_size], mask[i : i + batch_size])
                for i in range(0, len(texts), batch_size)
            ]
        )

    return {"eval_file": str(eval_file), "images": len(paths), **binding_scores(images, first, encode_text)}


# ------------------------------------------------------------------------------------------------ command line


SETTINGS = (
    "objective",
    "projection_dim",
    "image_size",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "max_steps",
    "max_minutes",
    "seed",
    "hard_negatives",
    "negatives_per_caption",
    "flip",
)


def build_parser() -> argparse.ArgumentParser:
    from modeling_clipcap.cli import add_bool_argument

    p = argparse.ArgumentParser(
        description="Pretrain an image tower contrastively against a small text tower (CLIP or FILIP loss)."
    )
    p.add_argument("--train_file", required=True, help="an image folder's metadata.jsonl (or the folder)")
    p.add_argument(
        "--image_dir", default=None, help="folder the file names are relative to (default: its folder)"
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tokenizer_name", required=True, help="the captioning tokenizer folder")
    p.add_argument(
        "--config",
        default=None,
        help="preset folder: vision tower from its config.json (clip_pretraining.json's vision_config overrides it), "
        "pretraining settings from clip_pretraining.json",
    )
    p.add_argument(
        "--vision_config",
        default=None,
        help="a JSON file with the tower's config (with model_type: clip_vision_model, siglip_vision_model, "
        "siglip2_vision_model, dinov2, vit, convnext, convnextv2, resnet); overrides the preset's",
    )
    p.add_argument("--objective", choices=OBJECTIVES, default=None, help="clip (default) or filip")
    p.add_argument("--projection_dim", type=int, default=None, help="joint width (towers other than CLIP)")
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="for towers without image_size (CNNs; not SigLIP2's patches)",
    )
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=None)
    p.add_argument("--warmup_steps", type=int, default=None)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--max_minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--hard_negatives",
        nargs="*",
        default=None,
        metavar="KIND",
        help="hard negative captions in the loss (NegCLIP): any of swap_attributes swap_objects swap_relation "
        "change_attribute (no KIND: none)",
    )
    p.add_argument(
        "--negatives_per_caption",
        type=int,
        default=None,
        help="hard negatives per caption and step (default 1)",
    )
    p.add_argument(
        "--flip",
        nargs="*",
        default=None,
        choices=FLIP_AXES,
        help="relation-aware flips: horizontal (left <-> right in the captions) and/or vertical (above <-> below)",
    )
    p.add_argument(
        "--eval_file",
        default=None,
        help="a held-out image folder's metadata.jsonl: report the binding (ARO-style swap) scores on it",
    )
    add_bool_argument(p, "progress", default=True, help="progress bars")
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < the preset (config.json's vision_config, clip_pretraining.json) < --vision_config < flags."""
    settings = dict(DEFAULTS, vision_config=None)
    if args.config is not None:
        preset = read_preset(find_preset(args.config))
        settings["vision_config"] = preset["config"].get("vision_config")
        settings.update({k: v for k, v in preset.get("clip_pretraining", {}).items() if k != "_comment"})
    if args.vision_config is not None:
        path = Path(args.vision_config)
        if not path.is_file():
            raise FileNotFoundError(
                f"--vision_config {path} does not exist; pass a JSON file of tower config fields."
            )
        settings["vision_config"] = json.loads(path.read_text())
    for key in SETTINGS:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if not settings["vision_config"]:
        raise ValueError(
            "no vision tower config: pass --vision_config, or --config a preset with vision_config."
        )
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
        summary = pretrain_tower(
            args.train_file,
            args.output_dir,
            vision_config=settings["vision_config"],
            tokenizer_name=args.tokenizer_name,
            text_config=settings.get("text_config"),
            image_dir=args.image_dir,
            max_train_samples=args.max_train_samples,
            show_progress=args.progress,
            eval_file=args.eval_file,
            **{key: settings[key] for key in SETTINGS},
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
