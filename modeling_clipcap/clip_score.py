"""CLIPScore (Hessel et al., 2021), offline, over a transformers ``CLIPModel``.

``CLIP-S = w * max(cos(image, caption), 0)`` with ``w = 2.5`` and the caption prefixed with
``"A photo depicts"``; ``RefCLIP-S`` is the harmonic mean of CLIP-S and ``max(max_r cos(caption, r), 0)`` over
the references ``r``. Pure functions on embeddings (:func:`clip_score_from_embeddings`,
:func:`ref_clip_score_from_embeddings`) and batched functions over a ``CLIPModel`` (:func:`compute_clip_score`),
shared by ``clipcap evaluate``, the ``clipscore`` evaluate module under ``metrics/`` and the app's ranking.
Nothing in this module touches the network: :func:`load_clip` reads a local folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CLIPSCORE_PROMPT",
    "CLIPSCORE_W",
    "clip_score_from_embeddings",
    "compute_clip_score",
    "encode_clip_images",
    "encode_clip_texts",
    "load_clip",
    "max_reference_similarity",
    "ref_clip_score_from_embeddings",
]

CLIPSCORE_W: float = 2.5
CLIPSCORE_PROMPT: str = "A photo depicts"


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def clip_score_from_embeddings(
    image_embeds: torch.Tensor, caption_embeds: torch.Tensor, w: float = CLIPSCORE_W
) -> torch.Tensor:
    """Per-pair CLIP-S = ``w * max(cos(image, caption), 0)``.

    Args:
        image_embeds: ``(N, D)`` CLIP image embeddings (normalised here).
        caption_embeds: ``(N, D)`` CLIP text embeddings of the prompted captions.
        w: the rescaling weight, 2.5 in the paper.

    Returns:
        ``(N,)`` float32 scores in ``[0, w]``.
    """
    if image_embeds.ndim != 2 or image_embeds.shape != caption_embeds.shape:
        raise ValueError(
            f"image_embeds and caption_embeds must both be (N, D), got {tuple(image_embeds.shape)} "
            f"and {tuple(caption_embeds.shape)}"
        )
    cos = (_normalize(image_embeds) * _normalize(caption_embeds)).sum(-1)
    return w * cos.clamp(min=0)


def max_reference_similarity(
    caption_embeds: torch.Tensor, reference_embeds: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``max(max_r cos(caption, r), 0)`` per caption.

    Args:
        caption_embeds: ``(N, D)`` CLIP text embeddings of the captions.
        reference_embeds: N tensors, the i-th ``(R_i, D)`` with ``R_i >= 1``
            embeddings of the i-th caption's references.

    Returns:
        ``(N,)`` float32 values in ``[0, 1]``.
    """
    if len(reference_embeds) != caption_embeds.shape[0]:
        raise ValueError(
            f"need one reference tensor per caption: {caption_embeds.shape[0]} captions, "
            f"{len(reference_embeds)} reference tensors"
        )
    caps = _normalize(caption_embeds)
    out = []
    for i, refs in enumerate(reference_embeds):
        if refs.ndim != 2 or refs.shape[0] == 0 or refs.shape[1] != caps.shape[1]:
            raise ValueError(
                f"references of caption {i} must be (R >= 1, {caps.shape[1]}), got {tuple(refs.shape)}"
            )
        out.append((_normalize(refs) @ caps[i]).max())
    return torch.stack(out).clamp(min=0)


def ref_clip_score_from_embeddings(
    image_embeds: torch.Tensor,
    caption_embeds: torch.Tensor,
    reference_embeds: Sequence[torch.Tensor],
    w: float = CLIPSCORE_W,
) -> torch.Tensor:
    """Per-pair RefCLIP-S = harmonic mean of CLIP-S and ``max(max_r cos(caption, r), 0)``.

    Shapes as in :func:`clip_score_from_embeddings` and
    :func:`max_reference_similarity`; returns ``(N,)`` (0 where both terms are 0).
    """
    clip_s = clip_score_from_embeddings(image_embeds, caption_embeds, w=w)
    ref_s = max_reference_similarity(caption_embeds, reference_embeds)
    denom = clip_s + ref_s
    return torch.where(denom > 0, 2 * clip_s * ref_s / denom.clamp(min=1e-12), torch.zeros_like(denom))


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _open_image(image: Any) -> Any:
    from PIL import Image

    from .image_io import load_image

    if isinstance(image, (str, os.PathLike, bytes)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    return image  # arrays / tensors go to the image processor as they are


@torch.no_grad()
def encode_clip_images(
    model: Any,
    image_processor: Any,
    images: Sequence[Any],
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised CLIP image embeddings, batched.

    Args:
        model: a transformers ``CLIPModel`` (anything with ``get_image_features``).
        image_processor: its image processor (``CLIPImageProcessor``).
        images: PIL images, or paths opened one batch at a time.
        batch_size: images per forward pass.
        progress: show a tqdm bar.

    Returns:
        ``(N, D)`` float32 on CPU, unit norm.
    """
    from tqdm.auto import tqdm

    device = model.device
    dtype = next(model.parameters()).dtype
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="CLIP images", disable=not progress):
        batch = [_open_image(img) for img in images[start : start + batch_size]]
        pixel_values = image_processor(images=batch, return_tensors="pt")["pixel_values"]
        feats = _features(model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype)))
        chunks.append(_normalize(feats).cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


@torch.no_grad()
def encode_clip_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    prompt: str | None = CLIPSCORE_PROMPT,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised CLIP text embeddings of ``prompt + " " + text``, batched.

    Texts longer than the text tower's context (77 tokens for OpenAI CLIP) are
    truncated, as the reference implementation does.

    Returns:
        ``(N, D)`` float32 on CPU, unit norm.
    """
    from tqdm.auto import tqdm

    if prompt:
        prompt = prompt if prompt.endswith(" ") else prompt + " "
        texts = [prompt + t for t in texts]
    device = model.device
    max_length = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="CLIP texts", disable=not progress):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        feats = _features(
            model.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
        )
        chunks.append(_normalize(feats).cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def load_clip(path: str | os.PathLike, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """Load a ``CLIPModel`` and its processor from a local directory (never the network).

    Returns:
        ``(model, processor)`` with the model in eval mode on ``device``.
    """
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"CLIP model directory {str(path)!r} does not exist: pass a local folder holding a CLIPModel "
            "saved with save_pretrained (e.g. a downloaded openai/clip-vit-base-patch32)"
        )
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    if device is not None:
        model.to(device)
    return model, processor


def compute_clip_score(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    captions: Sequence[str],
    references: Sequence[Sequence[str]] | None = None,
    *,
    batch_size: int = 32,
    w: float = CLIPSCORE_W,
    prompt: str | None = CLIPSCORE_PROMPT,
    per_image: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """CLIP-S and (with references) RefCLIP-S of captions for images, batched.

    Args:
        model: a transformers ``CLIPModel``.
        processor: a ``CLIPProcessor`` (or any object with ``image_processor``
            and ``tokenizer`` attributes).
        images: N PIL images or image paths.
        captions: N candidate captions, ``captions[i]`` describing ``images[i]``.
        references: optional N lists of reference captions (prompted like the
            candidates, as in the reference implementation). Empty lists are
            allowed only when all are empty (then RefCLIP-S is not computed).
        w: CLIP-S weight (2.5).
        prompt: text prefix (``"A photo depicts"``); None for none.
        per_image: also return the per-pair scores as lists.

    Returns:
        ``{"CLIP-S": mean, "RefCLIP-S": mean (with references), "num_images": N}``
        plus ``"CLIP-S_per_image"`` / ``"RefCLIP-S_per_image"`` lists when
        ``per_image``. Scores are in [0, w]; papers print them x100.
    """
    if len(images) != len(captions):
        raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
    if not captions:
        raise ValueError("no captions to score")
    if references is not None:
        if len(references) != len(captions):
            raise ValueError(
                f"need one reference list per caption: {len(captions)} captions, {len(references)} lists"
            )
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        if all(len(r) == 0 for r in references):
            references = None
        elif any(len(r) == 0 for r in references):
            empty = [i for i, r in enumerate(references) if not r]
            raise ValueError(f"RefCLIP-S needs references for every caption; none for items {empty[:5]}")
    image_processor = getattr(processor, "image_processor", processor)
    tokenizer = getattr(processor, "tokenizer", processor)

    image_embeds = encode_clip_images(
        model, image_processor, images, batch_size=batch_size, progress=progress
    )
    caption_embeds = encode_clip_texts(model, tokenizer, captions, batch_size=batch_size, prompt=prompt)
    clip_s = clip_score_from_embeddings(image_embeds, caption_embeds, w=w)
    out: dict[str, Any] = {"CLIP-S": float(clip_s.mean())}
    ref_s = None
    if references is not None:
        flat = [r for refs in references for r in refs]
        flat_embeds = encode_clip_texts(model, tokenizer, flat, batch_size=batch_size, prompt=prompt)
        sizes = [len(refs) for refs in references]
        ref_s = ref_clip_score_from_embeddings(
            image_embeds, caption_embeds, list(flat_embeds.split(sizes)), w=w
        )
        out["RefCLIP-S"] = float(ref_s.mean())
    out["num_images"] = len(captions)
    if per_image:
        out["CLIP-S_per_image"] = clip_s.tolist()
        if ref_s is not None:
            out["RefCLIP-S_per_image"] = ref_s.tolist()
    return out
