"""Shared fixtures: tiny tokenizers, configs and models built offline in milliseconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]

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


#: What each test photo is (file name -> (source, what it exercises)); see :func:`real_photos`.
REAL_PHOTOS = {
    "grace_hopper.jpg": ("matplotlib", "a camera JPEG as published"),
    "rocket.jpg": ("scikit-image", "a camera JPEG as published, landscape"),
    "chelsea_exif_rotated.jpg": (
        "scikit-image chelsea.png",
        "JPEG whose EXIF says: rotate 90 degrees to display",
    ),
    "camera_grey.jpg": ("scikit-image camera.png", "greyscale (L) JPEG"),
    "coffee_cmyk.jpg": ("scikit-image coffee.png", "CMYK JPEG"),
    "astronaut_odd_size.jpg": ("scikit-image astronaut.png", "JPEG of an odd size (333 x 197)"),
}


def _photo_sources() -> tuple[Path, Path]:
    """(matplotlib's sample-data folder, scikit-image's data folder): real photographs shipped inside the wheels
    of packages the dev extra installs (public domain / CC0 per those projects), read through the packages."""
    import matplotlib.cbook
    import skimage.data

    hopper = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return hopper.parent, Path(skimage.data.data_dir)


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory) -> list[Path]:
    """Six real photographs as JPEG files (:data:`REAL_PHOTOS`): two as their publishers encoded them, four
    re-encoded here from real photos to cover EXIF orientation, greyscale, CMYK and an odd size. No file
    outside the repository and its installed packages is read."""
    from PIL import Image

    matplotlib_data, skimage_data = _photo_sources()
    folder = tmp_path_factory.mktemp("real_photos")
    (folder / "grace_hopper.jpg").write_bytes((matplotlib_data / "grace_hopper.jpg").read_bytes())
    (folder / "rocket.jpg").write_bytes((skimage_data / "rocket.jpg").read_bytes())
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.open(skimage_data / "chelsea.png").convert("RGB").save(
        folder / "chelsea_exif_rotated.jpg", exif=exif
    )
    Image.open(skimage_data / "camera.png").convert("L").save(folder / "camera_grey.jpg", quality=90)
    Image.open(skimage_data / "coffee.png").convert("CMYK").save(folder / "coffee_cmyk.jpg", quality=90)
    astronaut = Image.open(skimage_data / "astronaut.png").convert("RGB")
    astronaut.crop((90, 40, 90 + 333, 40 + 197)).save(folder / "astronaut_odd_size.jpg", quality=90)
    return [folder / name for name in REAL_PHOTOS]


def tiny_clipcap_config(vocab_size: int, mapping_type: str = "mlp", with_vision: bool = True, **overrides):
    """A ClipCap config small enough for unit tests (vision 32x32, GPT-2 width 32, K=4)."""
    from modeling_clipcap import ClipCapConfig

    kwargs = dict(
        vision_config=tiny_vision_config() if with_vision else None,
        image_embed_dim=None if with_vision else 24,
        text_config=tiny_text_config(vocab_size),
        mapping_type=mapping_type,
        prefix_length=4,
        clip_length=3,
        mapping_num_layers=2,
        mapping_num_heads=4,
    )
    kwargs.update(overrides)
    return ClipCapConfig(**kwargs)


def build_tiny_processor(tokenizer):
    """A ClipCapProcessor with a 32x32 CLIP image processor and the given tokenizer."""
    from transformers import CLIPImageProcessorPil

    from modeling_clipcap import ClipCapProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ClipCapProcessor(image_processor=image_processor, tokenizer=tokenizer)


def write_tiny_preset(folder: Path, training_args: dict, max_new_tokens: int = 6) -> Path:
    """A training preset folder for train.py: tiny tokenizer, tiny ClipCap config, generation config and
    the given ``training_args.json``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(tiny_clipcap_config(len(tok)).to_dict()))
    (folder / "generation_config.json").write_text(
        json.dumps({"max_new_tokens": max_new_tokens, "num_beams": 1})
    )
    (folder / "training_args.json").write_text(json.dumps(training_args))
    return folder


def subprocess_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a train.py / accelerate subprocess: one thread, offline, a private HF_HOME (no user
    accelerate config, no shared caches), unbuffered output; ``extra`` added last."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp / "hf_home"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    return tiny_clipcap_config(len(tiny_tokenizer))


@pytest.fixture()
def tiny_model(tiny_config):
    from modeling_clipcap import ClipCapForConditionalGeneration

    torch.manual_seed(0)
    return ClipCapForConditionalGeneration(tiny_config).eval()


@pytest.fixture()
def tiny_processor(tiny_tokenizer):
    import copy

    return build_tiny_processor(copy.deepcopy(tiny_tokenizer))


# --- hub emulator fixture ---
# Tests of code that talks to the Hugging Face Hub run the real huggingface_hub client against a local
# emulation of the Hub HTTP API (tests/hub_emulator.py) on 127.0.0.1. The client reads HF_ENDPOINT at
# import time, so drive it in a subprocess: hub_server.run_python(code) or run_python(code, hub_server.env()).
from hub_emulator import HubEmulator, run_python  # noqa: E402, F401  (run_python re-exported for tests)


@pytest.fixture
def hub_server(tmp_path_factory):
    """A running :class:`hub_emulator.HubEmulator`, stopped when the test ends.

    ``.endpoint`` ("http://127.0.0.1:PORT"), ``.env(extra=None, hf_home=None)`` (os.environ copy with
    HF_ENDPOINT, fake HF_TOKEN, fresh HF_HOME, offline flags removed, HF_HUB_DISABLE_XET=1, telemetry off),
    ``.run_python(code, extra_env=None, cwd=None, timeout=300)``, ``.token``, ``.user``, and for assertions
    ``.files(repo_id, revision="main")``, ``.lfs_files(...)``, ``.history(...)``, ``.requests``,
    ``.assert_all_handled()``.
    """
    hub = HubEmulator(home_root=tmp_path_factory.mktemp("hf_home"))
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


# --- end hub emulator fixture ---


class _DeprecationNotices:
    """Collects deprecation notices that transformers sends through its logger (``logger.warning_once``),
    which ``filterwarnings`` cannot see: e.g. "`past_key_values`/`cache_params` are deprecated"."""

    def __init__(self) -> None:
        import logging

        self.records: list[str] = []
        self.handler = logging.Handler(level=logging.WARNING)
        self.handler.emit = lambda record: self.records.append(record.getMessage())  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def no_transformers_deprecation_notices():
    """Fail a test whose calls make transformers log a deprecation notice (see pyproject's filterwarnings)."""
    import logging

    notices = _DeprecationNotices()
    logger = logging.getLogger("transformers")
    logger.addHandler(notices.handler)
    try:
        yield
    finally:
        logger.removeHandler(notices.handler)
    deprecated = [m for m in notices.records if "deprecat" in m.lower()]
    assert not deprecated, f"transformers logged a deprecation notice for our calls: {deprecated}"
