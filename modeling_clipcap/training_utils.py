"""Training helpers that are not part of the model (nothing that travels with a saved model imports this file):
what an optimizer gets from a ClipCap model."""

from __future__ import annotations

from typing import Any

from torch import nn


def optimizer_parameter_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` as AdamW groups: biases, norm weights and vectors get no weight decay.

    Frozen parameters (``requires_grad=False``: the vision tower, or the language model with
    ``freeze_language_model``) are left out. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm = ".ln_" in name or "norm" in name
        (no_decay if name.endswith("bias") or is_norm or param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


__all__ = ["optimizer_parameter_groups"]
