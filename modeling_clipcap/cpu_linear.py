"""oneDNN linear layers for CPU inference (opt-in): every matrix product of a model through prepacked oneDNN.

PyTorch runs float32 linear layers on CPU through MKL. On AMD CPUs MKL picks its AVX2 kernels even where the
CPU has AVX-512; oneDNN picks kernels by the CPU's instruction sets, and with weights prepacked into its
blocked layout it ran the products of ClipCap's CLIP ViT-B/32 + GPT-2 at 2-2.7x MKL's speed on the
benchmark machine (AMD EPYC with AVX-512, one thread; bf16 layers 1.1-1.3x). :func:`use_onednn_linear`
reroutes the forward of every ``nn.Linear`` and GPT-2-style ``Conv1D`` of a model (tower, mapper, language
model, output layer) to a oneDNN product with a packed copy of its weight, made once:

    from modeling_clipcap.cpu_linear import use_onednn_linear

    model = AutoModel.from_pretrained(path).eval()
    use_onednn_linear(model)        # returns how many layers were rerouted (0 where oneDNN is unavailable)
    ids = model.generate(pixel_values=batch, num_beams=5)

Each output is the same dot products summed in another order: equal to the default path up to float
rounding (about 1e-6 relative), and on the benchmark and the demo model the generated tokens were the same
(``docs/performance.md``, "oneDNN linear layers"). The rerouted path is used only on CPU, without gradients, in
float32 or bfloat16; anywhere else (training, GPU, another dtype) a layer runs its own forward. A weight
changed in place after packing (training, ``load_state_dict``) is repacked on the next call. The packed
copies take as much memory again as the layers' weights. :func:`restore_linear` undoes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .compat import onednn_linear_ops

__all__ = ["restore_linear", "use_onednn_linear"]

#: batch-size hint for the packed layout (oneDNN computes any number of rows with it)
_PACK_ROWS_HINT = 32
_DTYPES = (torch.float32, torch.bfloat16)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class _OneDnnForward:
    """A layer's forward through oneDNN with a packed copy of its weight; the layer's own forward otherwise."""

    def __init__(self, module: nn.Module, ops: tuple[Any, Any]):
        self.module = module
        self.pack, self.linear = ops
        self.transposed = _is_conv1d(module)
        self.original = type(module).forward.__get__(module)
        self.packed: Any = None
        self.key: tuple[Any, ...] | None = None

    def _packed_weight(self, weight: torch.Tensor) -> Any:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if key != self.key:
            w = weight.detach()
            w = w.t().contiguous() if self.transposed else w.contiguous()  # (out, in)
            self.packed, self.key = self.pack(w, _PACK_ROWS_HINT), key
        return self.packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight, self.module.bias
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or weight.device.type != "cpu"
            or weight.dtype not in _DTYPES
            or x.dtype != weight.dtype
            or (bias is not None and bias.dtype != weight.dtype)
        ):
            return self.original(x)
        packed = self._packed_weight(weight)
        return self.linear(x.contiguous(), packed, None if bias is None else bias.detach())


def use_onednn_linear(model: nn.Module) -> int:
    """Reroute every ``nn.Linear`` / ``Conv1D`` of ``model`` through prepacked oneDNN products (CPU inference).

    Also turns off the model's blocked output layer (``cpu_output_layer_block``), which would bypass the
    output layer's forward. Returns the number of layers rerouted: 0 where this torch build has no usable
    oneDNN linear ops (then nothing changes). Idempotent.
    """
    ops = onednn_linear_ops()
    if ops is None:
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear or _is_conv1d(module)) and not isinstance(
            module.__dict__.get("forward"), _OneDnnForward
        ):
            module.forward = _OneDnnForward(module, ops)
            count += 1
        elif isinstance(module.__dict__.get("forward"), _OneDnnForward):
            count += 1
    if count and hasattr(model, "cpu_output_layer_block"):
        model.cpu_output_layer_block = None
    return count


def restore_linear(model: nn.Module) -> int:
    """Undo :func:`use_onednn_linear`: every layer back to its own forward (packed copies freed); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _OneDnnForward):
            del module.forward
            count += 1
    if count and "cpu_output_layer_block" in model.__dict__:
        del model.cpu_output_layer_block  # back to the class default
    return count
