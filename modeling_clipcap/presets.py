"""Preset folders (``hub_configs/<name>``): where they are and how they are read, for training and conversion.

A preset folder holds any of: ``config.json`` (ClipCap config fields, or a full config with
``vision_config`` / ``text_config``), ``generation_config.json``, ``training_args.json`` (defaults for
``training/train.py`` flags, or, in a conversion preset, the original run's recorded settings),
``preset.json`` (conversion metadata) and a model-card template (``README.md`` or ``model_card.md``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CARD_TEMPLATE_NAMES = ("README.md", "model_card.md")


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


def read_preset(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed files of a preset folder.

    Returns ``{"name", "dir", "config", "generation_config", "preset", "training_args", "card_template"}``:
    the JSON files as dicts (``{}`` when absent), ``card_template`` the template text or ``None``.
    Raises ValueError naming the file when one is not valid JSON.
    """
    path = Path(path)

    def read_json(name: str) -> dict[str, Any]:
        file = path / name
        if not file.is_file():
            return {}
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err

    card = next((path / n for n in CARD_TEMPLATE_NAMES if (path / n).is_file()), None)
    return {
        "name": path.name,
        "dir": path,
        "config": read_json("config.json"),
        "generation_config": read_json("generation_config.json"),
        "preset": read_json("preset.json"),
        "training_args": read_json("training_args.json"),
        "card_template": card.read_text(encoding="utf-8") if card is not None else None,
    }


__all__ = ["CARD_TEMPLATE_NAMES", "find_preset", "hub_configs_dir", "read_preset"]
