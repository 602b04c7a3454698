"""Preset folders (``hub_configs/<name>``): one schema and one loader for training, conversion and the demo.

Every preset folder holds the same files (absent ones read as empty):

========================== ==========================================================================
``config.json``            ClipCap config fields, or a full config with ``vision_config`` / ``text_config``
``generation_config.json`` decoding defaults of the model (validation, the published model)
``training_args.json``     defaults for ``training/train.py`` flags (``./`` paths are relative to the folder)
``README.md``              the model-card template (``string.Template``: ``$model_id``, ``$metrics``, ...)
``preset.json``            optional metadata: where a converted checkpoint comes from (``clipcap convert
                           --preset``), the paper's numbers, ``original_training`` (the original run)
other ``*.json``           settings of other scripts under the file's stem (``demo.json`` -> ``"demo"``)
========================== ==========================================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CARD_TEMPLATE_NAMES = ("README.md",)
#: the JSON files every preset may hold, by the key :func:`read_preset` returns them under
PRESET_FILES = {
    "config": "config.json",
    "generation_config": "generation_config.json",
    "training_args": "training_args.json",
    "preset": "preset.json",
}


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
    """A preset folder from a path or a name under :func:`hub_configs_dir`; FileNotFoundError names both."""
    for candidate in (Path(name), hub_configs_dir() / str(name)):
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"{str(name)!r}: no such preset folder (looked at {Path(name).resolve()} and "
        f"{hub_configs_dir() / str(name)}). Pass a folder with config.json / training_args.json, or set "
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


def read_preset(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed files of a preset folder (see the module docstring).

    Returns ``{"name", "dir", "config", "generation_config", "training_args", "preset", "card_template"}``
    plus one key per other ``*.json`` file (its stem): the JSON files as dicts (``{}`` when absent),
    ``card_template`` the ``README.md`` text or ``None``. Raises ValueError naming the file when one is not
    a JSON object.
    """
    path = Path(path)
    files = {key: _read_json(path / name) for key, name in PRESET_FILES.items()}
    for extra in sorted(path.glob("*.json")):
        if extra.name not in PRESET_FILES.values():
            files[extra.stem] = _read_json(extra)
    card = path / "README.md"
    return {
        "name": path.name,
        "dir": path,
        **files,
        "card_template": card.read_text(encoding="utf-8") if card.is_file() else None,
    }


__all__ = ["CARD_TEMPLATE_NAMES", "PRESET_FILES", "find_preset", "hub_configs_dir", "read_preset"]
