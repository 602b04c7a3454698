"""PEFT adapters for ClipCap training (LoRA and peft's other adapter methods), their folder and ``clipcap merge``.

Training side only: a saved ClipCap model never needs ``peft`` (``pip install 'modeling_clipcap[peft]'``).

How a run with adapters is laid out:

* :func:`build_adapter_config` turns ``train.py``'s ``--lora_*`` flags (or a peft config file,
  ``--peft_config``) into a peft config scoped to the **language model**: the target modules are matched
  below ``language_model.`` only, and the parts that train fully (the mapping network, and an unfrozen image
  tower) are peft's ``modules_to_save``. Module names that do not exist, or a rank below 1, raise a
  ValueError naming the modules that do.
* :func:`add_adapters` injects the adapters into the ClipCap model **in place** (``peft.get_peft_model``): the
  model keeps its class, ``forward`` and ``generate``; only the adapters and the ``modules_to_save`` have
  ``requires_grad``; the base weights stay bit-identical.
* At the end, :func:`save_adapter` writes a standard PEFT folder (``adapter_config.json`` +
  ``adapter_model.safetensors``: the adapters and the fully trained mapper) for
  ``PeftModel.from_pretrained(<base ClipCap model>, folder)``, and :func:`merge_adapters` folds the adapters
  into the weights, so the ClipCap folder itself loads with ``AutoModel`` (or remote code) and captions as at
  the end of training. :func:`merge_adapter` (``clipcap merge``) does the same from a base model and an
  adapter folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

#: where train.py writes the PEFT adapter folder inside its output folder
ADAPTER_DIR = "adapter"
#: train.py's adapter flags (keyword arguments of :func:`build_adapter_config`)
ADAPTER_ARGUMENTS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "peft_config")
#: the part of a ClipCap model the adapters go into
LANGUAGE_MODEL_PREFIX = "language_model."


def _require_peft() -> Any:
    try:
        import peft
    except ModuleNotFoundError as err:  # pragma: no cover - the dev extra installs it
        raise ModuleNotFoundError(
            "Adapters (--lora_r, --peft_config, clipcap merge) need the peft library: "
            "pip install 'modeling_clipcap[peft]'."
        ) from err
    return peft


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def adapter_target_names(model: Any) -> list[str]:
    """The names (last dotted component) of the linear layers of ``model.language_model`` that adapters can
    target, the output head excluded: ``["c_attn", "c_fc", "c_proj"]`` for GPT-2, ``q_proj``... for Llama."""
    language_model = model.language_model
    head = language_model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in language_model.named_modules()
            if _is_linear(m) and m is not head
        }
    )


def _default_targets(model: Any) -> list[str]:
    """peft's default LoRA targets for the language model's family, else every linear layer."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    names = adapter_target_names(model)
    default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.text_config.model_type)
    return [n for n in default if n in names] if default and set(default) & set(names) else names


def _scoped_targets(model: Any, requested: Sequence[str] | str | None, flag: str) -> tuple[str, list[str]]:
    """A peft ``target_modules`` regex that matches ``requested`` layer names below ``language_model.`` only,
    with the list of names; unknown names raise ValueError naming those that exist."""
    existing = adapter_target_names(model)
    if requested is None:
        names = _default_targets(model)
    elif requested == "all-linear" or list(requested) == ["all-linear"]:
        names = existing
    else:
        names = [requested] if isinstance(requested, str) else list(requested)
        missing = [n for n in names if n not in existing]
        if missing or not names:
            raise ValueError(
                f"{flag} {' '.join(names)}: the language model "
                f"({model.config.text_config.model_type}) has no linear layer named {', '.join(missing) or '(none given)'}; "
                f"its linear layers are: {', '.join(existing)} (or all-linear)."
            )
    body = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(LANGUAGE_MODEL_PREFIX)}(?:.*\.)?(?:{body})", names


def _modules_to_save(model: Any) -> list[str]:
    """What trains fully beside the adapters: the mapping network, and the image tower when it is not frozen."""
    keep = ["mapping_network"]
    if model.vision_model is not None and not model.config.freeze_vision:
        keep.append("vision_model")
    return keep


def build_adapter_config(
    model: Any,
    *,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_target_modules: Sequence[str] | None = None,
    peft_config: str | os.PathLike | None = None,
) -> Any:
    """The peft config of a run, or None without adapters (neither ``lora_r`` nor ``peft_config``).

    Args:
        model: the ClipCap model to train (its ``language_model`` gets the adapters).
        lora_r: LoRA rank (>= 1).
        lora_alpha: LoRA scaling numerator (default ``2 * lora_r``); the update is ``alpha / r * B @ A``.
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: names of the language model's linear layers (``c_attn``, ``q_proj``...), or
            ``["all-linear"]``; default: peft's choice for the model family (GPT-2: ``c_attn``).
        peft_config: a JSON file with any peft adapter config (``{"peft_type": "IA3", ...}``, the
            ``adapter_config.json`` format); its ``target_modules`` are names as above, and it may not be
            combined with ``lora_r``.
    """
    if lora_r is None and peft_config is None:
        if lora_target_modules or lora_alpha is not None or lora_dropout:
            raise ValueError(
                "--lora_alpha / --lora_dropout / --lora_target_modules need --lora_r (the rank)."
            )
        return None
    peft = _require_peft()
    if lora_r is not None and peft_config is not None:
        raise ValueError("give --lora_r or --peft_config, not both (a peft config file sets its own rank).")
    if peft_config is not None:
        return _config_from_file(model, Path(peft_config), peft)
    if int(lora_r) < 1:
        raise ValueError(
            f"--lora_r must be >= 1 (the adapters' rank), got {lora_r}; leave it unset to train without adapters."
        )
    target, names = _scoped_targets(model, lora_target_modules, "--lora_target_modules")
    return peft.LoraConfig(
        r=int(lora_r),
        lora_alpha=2 * int(lora_r) if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target,
        modules_to_save=_modules_to_save(model),
        fan_in_fan_out=_uses_conv1d(model, names),
    )


def _uses_conv1d(model: Any, names: Sequence[str]) -> bool:
    """GPT-2's layers are ``Conv1D`` (weight stored transposed): peft needs ``fan_in_fan_out`` for them."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(m, Conv1D)
        for n, m in model.language_model.named_modules()
        if n.rsplit(".", 1)[-1] in names
    )


def _config_from_file(model: Any, path: Path, peft: Any) -> Any:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--peft_config {path}: cannot read a JSON peft config ({err}).") from None
    if not isinstance(values, dict) or "peft_type" not in values:
        raise ValueError(
            f'--peft_config {path}: expected a JSON object with "peft_type" (e.g. "LORA", "IA3").'
        )
    peft_type = str(values["peft_type"]).upper()
    if peft_type not in peft.PeftType.__members__:
        raise ValueError(
            f"--peft_config {path}: unknown peft_type {values['peft_type']!r}; peft knows "
            f"{', '.join(peft.PeftType.__members__)}."
        )
    defaults = peft.get_peft_config({"peft_type": peft_type})
    if defaults.is_prompt_learning:
        raise ValueError(
            f"--peft_config {path}: {peft_type} is a prompt-learning method; ClipCap's prefix already is a "
            "learned prompt. Use an adapter method (LORA, IA3, LOHA, LOKR, ...)."
        )
    target, names = _scoped_targets(
        model, values.get("target_modules"), f"--peft_config {path}: target_modules"
    )
    values = dict(values, peft_type=peft_type, target_modules=target, modules_to_save=_modules_to_save(model))
    if "fan_in_fan_out" in defaults.to_dict():
        values.setdefault("fan_in_fan_out", _uses_conv1d(model, names))
    return peft.get_peft_config(values)


def add_adapters(model: Any, config: Any) -> Any:
    """Inject the adapters of ``config`` into ``model`` in place; returns the ``peft.PeftModel`` around it (kept
    for :func:`save_adapter` / :func:`merge_adapters`; train and generate with ``model`` itself).

    Only the adapters and ``config.modules_to_save`` train afterwards; the language model's own weights keep
    ``requires_grad=False`` and their values. ``model.config.freeze_language_model`` is set to False: the
    language model runs in training mode (dropout) as under full fine-tuning, its base weights frozen by peft.
    """
    peft = _require_peft()
    model.config.freeze_language_model = False
    with warnings.catch_warnings():
        # peft reads model.is_gradient_checkpointing, which transformers >= 5.25 deprecates in favour of
        # is_activation_checkpointing: the warning is about peft's call, not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


def save_adapter(peft_model: Any, folder: str | os.PathLike, base_model_name_or_path: str | None) -> Path:
    """The standard PEFT folder of the adapters: ``adapter_config.json`` (its ``base_model_name_or_path`` is
    the ClipCap model it applies to) and ``adapter_model.safetensors`` (the adapters and the fully trained
    ``modules_to_save``)."""
    folder = Path(folder)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_model_name_or_path
    peft_model.save_pretrained(str(folder))
    return folder


def merge_adapters(peft_model: Any) -> Any:
    """Fold the adapters into the weights (``merge_and_unload``): the plain ClipCap model, same outputs up to
    float rounding, no peft needed to load it once saved.

    The fully trained parts (``modules_to_save``) are put back in place first: peft 0.21's IA3 unloading
    expects a ``weight`` on every wrapped module, which a mapping network does not have.
    """
    from peft.utils import ModulesToSaveWrapper

    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, leaf = name.rpartition(".")
            trained = module.modules_to_save[module.active_adapters[0]]
            setattr(model.get_submodule(parent) if parent else model, leaf, trained)
    return peft_model.merge_and_unload()


def merge_adapter(
    base_model: str | os.PathLike, adapter: str | os.PathLike, output_dir: str | os.PathLike
) -> Path:
    """``clipcap merge``: load the base ClipCap model, apply the PEFT adapter folder and save the merged model
    (with the base's processor and generation config) to ``output_dir``, a folder that loads without peft."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from .modeling_clipcap import ClipCapForConditionalGeneration

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json).")
    base = ClipCapForConditionalGeneration.from_pretrained(str(base_model))
    with warnings.catch_warnings():  # see add_adapters
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = merge_adapters(PeftModel.from_pretrained(base, str(adapter)))
    merged.config.freeze_language_model = False
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    try:
        AutoProcessor.from_pretrained(str(base_model)).save_pretrained(output_dir)
    except (OSError, ValueError):  # an embeddings-only base may ship no processor
        pass
    return output_dir


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant ``torch.utils.checkpoint``), in the tower and
    the language model: transformers >= 5.25 names it ``activation_checkpointing_enable``, earlier releases
    ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_public_hub_model(name_or_path: str | None, token: str | None = None) -> bool:
    """Whether ``name_or_path`` is a model repository on the Hub anyone can read (not a local folder)."""
    if not name_or_path or Path(name_or_path).exists():
        return False
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        return not HfApi(token=token).model_info(name_or_path).private
    except (RepositoryNotFoundError, HfHubHTTPError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ clipcap merge


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``clipcap merge --base_model BASE --adapter ADAPTER --output_dir OUT``."""
    parser.add_argument("--base_model", required=True, help="The ClipCap model the adapter was trained on.")
    parser.add_argument("--adapter", required=True, help="A PEFT adapter folder (e.g. a run's adapter/).")
    parser.add_argument("--output_dir", required=True, help="Where the merged model is written.")


def cli_main(args: argparse.Namespace) -> int:
    try:
        out = merge_adapter(args.base_model, args.adapter, args.output_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"clipcap merge: error: {err}")
        return 2
    print(f"Merged model: {out}")
    return 0


__all__ = [
    "ADAPTER_ARGUMENTS",
    "ADAPTER_DIR",
    "adapter_target_names",
    "add_adapters",
    "build_adapter_config",
    "enable_activation_checkpointing",
    "is_public_hub_model",
    "merge_adapter",
    "merge_adapters",
    "save_adapter",
]
