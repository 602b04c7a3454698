"""Shared fixtures: tiny tokenizers, configs and models built offline in milliseconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO_ROOT.parent / "shared" / "real_images"

TINY_CORPUS = [
    "a red circle on a blue square.",
    "a small green triangle.",
    "two dogs playing in the park.",
    "a man riding a horse on the beach.",
    "a plate of food with broccoli and rice.",
    "a cat sitting on a wooden table.",
    "people walking down a city street.",
    "a large yellow square left of a purple circle.",
] * 4


def build_tiny_tokenizer(save_dir: str | os.PathLike | None = None, vocab_size: int = 300):
    """A byte-level BPE GPT-2 tokenizer trained offline on a tiny corpus.

    Like GPT-2: "." has id 13, ``<|endoftext|>`` is bos/eos/unk (the last id). No pad token.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        bpe.save(path)
        tok = GPT2TokenizerFast(tokenizer_file=path)
    tok.add_special_tokens(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    )
    assert tok.convert_tokens_to_ids(".") == 13, "tiny tokenizer must map '.' to 13 like GPT-2"
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def tiny_vision_config(**overrides):
    from transformers import CLIPVisionConfig

    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def tiny_text_config(vocab_size: int, **overrides):
    from transformers import GPT2Config

    kwargs = dict(
        vocab_size=vocab_size,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def shared_images() -> list[Path]:
    paths = sorted(p for p in SHARED_IMAGES.glob("*.jpg"))
    assert paths, f"no real images found under {SHARED_IMAGES}"
    return paths
