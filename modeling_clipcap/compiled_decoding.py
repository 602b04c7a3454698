"""Compiled decoding: ``generate`` with a static KV cache and its decoding step compiled by ``torch.compile``.

transformers compiles a model's forward for the decoding steps when ``generate`` gets
``cache_implementation="static"`` (a preallocated cache, so every step has the same shapes) and a
``CompileConfig``; it does so by default on GPUs only. :func:`compiled_decoding_kwargs` builds those
arguments for any device, and on CPU adds Inductor's *freezing* (the weights become constants of the
compiled graph, so Inductor prepacks the linear layers for oneDNN, which uses the CPU's widest vector
units). :func:`compile_image_tower` compiles the image tower the same way. Both give the same tokens as
eager decoding (tested); both pay a compilation on the first call of each new batch shape (tens of
seconds on a CPU), so they pay off for long captioning jobs at a fixed batch size, not for one-off
calls. Measured speed-ups and when they do not pay: ``docs/performance.md``, "Compiled decoding".

    from modeling_clipcap.compiled_decoding import compile_image_tower, compiled_decoding_kwargs

    compile_image_tower(model)                      # optional: the tower too
    ids = model.generate(pixel_values=batch, max_new_tokens=20, **compiled_decoding_kwargs(model))

With freezing, the compiled graph holds the weights as they were at the first call: compile after loading
(and after any ``.to(dtype)``), not before further training or weight edits.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import allow_compile_on_all_devices

__all__ = ["compile_image_tower", "compiled_decoding_kwargs"]


def _inductor_options(device: torch.device, freezing: bool | None) -> dict[str, Any] | None:
    freeze = device.type == "cpu" if freezing is None else freezing
    return {"freezing": True} if freeze else None


def compiled_decoding_kwargs(
    model: Any, *, freezing: bool | None = None, mode: str | None = None, fullgraph: bool = False
) -> dict[str, Any]:
    """``generate`` keyword arguments that decode with a static cache and a compiled decoding step.

    Args:
        model: a ``ClipCapForConditionalGeneration`` (its device decides the defaults).
        freezing: Inductor's weight freezing; default: on for CPU (prepacked oneDNN linear layers), off elsewhere.
        mode: ``torch.compile`` mode; default: transformers' (``"reduce-overhead"``: CUDA graphs on a GPU); not
            with freezing (``torch.compile`` takes a mode or options).
        fullgraph: ask ``torch.compile`` for one graph without breaks.

    Returns:
        ``{"cache_implementation": "static", "compile_config": CompileConfig(...)}`` to pass to ``generate``.
        Where the installed transformers offers no way to compile on this device, ``generate`` warns and
        decodes eagerly with the static cache (same tokens).
    """
    from transformers import CompileConfig

    device = torch.device(getattr(model, "device", "cpu"))
    config_kwargs: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": False}
    options = _inductor_options(device, freezing)
    if options is not None:
        if mode is not None:
            raise ValueError(
                f"torch.compile takes a mode or Inductor options, not both: drop mode={mode!r} or pass freezing=False."
            )
        config_kwargs.update(mode=None, options=options)  # torch.compile refuses a mode next to options
    elif mode is not None:
        config_kwargs["mode"] = mode
    config = CompileConfig(**config_kwargs)
    if device.type not in ("cuda", "xpu"):
        allow_compile_on_all_devices(config)
    return {"cache_implementation": "static", "compile_config": config}


def compile_image_tower(model: Any, *, freezing: bool | None = None) -> Any:
    """Compile the image tower's forward in place (``torch.compile``, static shapes); returns the model.

    The first call of each new batch shape compiles. ``freezing``: as in :func:`compiled_decoding_kwargs`.
    Without a tower (an embeddings-only model) nothing changes.
    """
    tower = getattr(model, "vision_model", None)
    if tower is None:
        return model
    device = next(tower.parameters()).device
    options = _inductor_options(device, freezing)
    tower.forward = torch.compile(type(tower).forward.__get__(tower), dynamic=False, options=options)
    return model
