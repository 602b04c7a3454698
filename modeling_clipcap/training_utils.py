"""Training helpers that are not part of the model: what an optimizer gets from a ClipCap model, and how
``train()`` treats its frozen parts."""

from __future__ import annotations

from typing import Any

from torch import nn


def optimizer_parameter_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` as AdamW groups: biases, norm weights and vectors get no weight decay.

    Frozen parameters (``requires_grad=False``: the vision tower, or GPT-2 with ``freeze_language_model``) are
    left out. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm = ".ln_" in name or "norm" in name
        (no_decay if name.endswith("bias") or is_norm or param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class FrozenPartsTrainingMixin:
    """``train()`` that keeps frozen parts in eval mode, and the deprecated parameter helpers of 0.1.0.

    Freezing follows the config: ``freeze_vision`` (the image tower) and ``freeze_language_model``.
    """

    def _apply_freezing(self) -> None:
        """Freeze the parts the config names (``requires_grad=False``, eval mode)."""
        if self.vision_model is not None and self.config.freeze_vision:
            self.vision_model.requires_grad_(False).eval()
        if self.config.freeze_language_model:
            self.language_model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Any:
        """Like ``nn.Module.train`` but frozen sub-models stay in eval mode (no dropout)."""
        super().train(mode)
        self._apply_freezing() if mode else None
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Deprecated: ``[p for p in model.parameters() if p.requires_grad]``."""
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_parameter_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Deprecated alias of ``training_utils.optimizer_parameter_groups(model, weight_decay)``."""
        return optimizer_parameter_groups(self, weight_decay)


__all__ = ["FrozenPartsTrainingMixin", "optimizer_parameter_groups"]
