"""Preset folders (``hub_configs/<name>``): one schema and one lookup for training, conversion and the demo.

One folder per model recipe; every folder holds the same files (absent ones read as empty):

============================ ========================================================================
``config.json``              ClipCap config fields, or a full config with ``vision_config`` / ``text_config``
``generation_config.json``   decoding defaults of the model (validation, the published model)
``training_args.json``       defaults for ``training/train.py`` flags (``./`` paths are relative to the folder)
``README.md``                the card of a model ``train.py`` trains (``string.Template``: ``$model_id``, ...)
``preset.json``              optional, for a released original checkpoint (``clipcap convert --preset``): where
                             it comes from, ``image_embed_dim`` (the width of its image embeddings), the
                             paper's numbers, ``original_training`` (the original run)
``conversion_card.md``       optional: the card of that checkpoint converted (``${source_file}``, ...)
other ``*.json``             settings of other scripts under the file's stem (``demo.json`` -> ``"demo"``)
============================ ========================================================================

:func:`find_preset` is the lookup every command uses (``train.py --config``, ``clipcap convert --preset``,
the demo, ``pretrain_clip.py``); :func:`read_preset` parses a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: the model-card templates a preset may hold, by the key :func:`read_preset` returns them under
CARD_TEMPLATES = {"card_template": "README.md", "conversion_card_template": "conversion_card.md"}
CARD_TEMPLATE_NAMES = tuple(CARD_TEMPLATES.values())
#: the JSON files every preset may hold, by the key :func:`read_preset` returns them under
PRESET_FILES = {
    "config": "config.json",
    "generation_config": "generation_config.json",
    "training_args": "training_args.json",
    "preset": "preset.json",
}
#: earlier names that still find a preset: ``clipcap convert --preset coco-mlp`` named the conversion of a
#: released checkpoint before its conversion and training presets became one folder
PRESET_ALIASES = {"coco-mlp": "clipcap-coco-mlp", "coco-transformer": "clipcap-coco-transformer"}


def hub_configs_dir() -> Path:
    """The ``hub_configs/`` folder: ``$CLIPCAP_HUB_CONFIGS`` if set, else the repository's (a checkout or an
    editable install), else the copy a wheel installs as ``modeling_clipcap/hub_configs``."""
    env = os.environ.get("CLIPCAP_HUB_CONFIGS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[1] / "hub_configs"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "hub_configs"


def find_preset(name: str | os.PathLike) -> Path:
    """A preset folder from a path, a name under :func:`hub_configs_dir` or one of :data:`PRESET_ALIASES`;
    FileNotFoundError names where it looked.

    A folder with weights is a model, never a preset: ``--config clipcap-coco-mlp`` run beside a converted or
    trained ``clipcap-coco-mlp/`` still finds the preset.
    """
    named = hub_configs_dir() / PRESET_ALIASES.get(str(name), str(name))
    for candidate in (Path(name), named):
        if candidate.is_dir() and not any(candidate.glob("*.safetensors")):
            return candidate.resolve()
    shipped = sorted(p.parent.name for p in hub_configs_dir().glob("*/config.json"))
    raise FileNotFoundError(
        f"{str(name)!r}: no such preset folder (looked at {Path(name).resolve()} and {named}). Use one of "
        f"{', '.join(shipped) or '(none found)'}, pass a folder with config.json / training_args.json, or set "
        "CLIPCAP_HUB_CONFIGS to a hub_configs/ folder."
    )


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(value).__name__}.")
    return value


def _read_text(file: Path) -> str | None:
    return file.read_text(encoding="utf-8") if file.is_file() else None


def read_preset(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed files of a preset folder (see the module docstring).

    Returns ``{"name", "dir", "config", "generation_config", "training_args", "preset", "card_template",
    "conversion_card_template"}`` plus one key per other ``*.json`` file (its stem): the JSON files as dicts
    (``{}`` when absent), the card templates as text (``None`` when absent). Raises ValueError naming the file
    when one is not a JSON object.
    """
    path = Path(path)
    files = {key: _read_json(path / name) for key, name in PRESET_FILES.items()}
    for extra in sorted(path.glob("*.json")):
        if extra.name not in PRESET_FILES.values():
            files[extra.stem] = _read_json(extra)
    cards = {key: _read_text(path / name) for key, name in CARD_TEMPLATES.items()}
    return {"name": path.name, "dir": path, **files, **cards}


__all__ = [
    "CARD_TEMPLATES",
    "CARD_TEMPLATE_NAMES",
    "PRESET_ALIASES",
    "PRESET_FILES",
    "find_preset",
    "hub_configs_dir",
    "read_preset",
]
