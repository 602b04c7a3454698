"""The one place that knows how transformers differs across the supported range.

This file travels with every saved model (``save_pretrained`` copies it next to the modeling code), so
it runs under whatever transformers the *user* has installed. It must import on any transformers
release: it imports nothing but ``transformers`` itself at module level.

What it covers (each entry of the private-name table in ``docs/compatibility.md`` points here):

* :func:`require_supported_transformers`: one clear error naming the supported range, instead of a
  ``TypeError`` deep inside, when the code finds itself under a release it was not written for.
* :data:`CACHE_KWARG`: transformers 5.24 renamed the key/value cache from ``past_key_values`` to
  ``cache`` in model ``forward`` s, ``generate`` and every ``ModelOutput``; older releases only know
  ``past_key_values``. :func:`cache_kwargs` and :func:`output_cache` pass and read it under the
  installed name, so no call of ours triggers the rename's deprecation warning;
  :func:`pop_cache_argument` accepts the old name from callers, with the ``FutureWarning``
  transformers' own models give (only where the installed release has the new name).
* :func:`logits_processor_hook_available`: the private ``GenerationMixin._get_logits_processor`` hook
  that ``modeling_clipcap.FastDecodingMixin`` overrides for the CPU decoding speed path. If a release moves or
  reshapes it, the speed path switches itself off (stock processors, same captions, a little slower)
  instead of crashing.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import transformers

#: The transformers releases this code is tested with (CI runs the suite at the lower bound and at the
#: newest release). Keep in sync with pyproject.toml and docs/compatibility.md.
MINIMUM_TRANSFORMERS = (5, 20, 0)
SUPPORTED_TRANSFORMERS = ">=5.20.0,<6"


def _release(version: str) -> tuple[int, int, int]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``; missing parts count as 0."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def require_supported_transformers(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the supported range when ``version`` (default: installed) is outside it."""
    version = transformers.__version__ if version is None else version
    release = _release(version)
    if release < MINIMUM_TRANSFORMERS or release[0] >= 6:
        raise ImportError(
            f"ClipCap needs transformers {SUPPORTED_TRANSFORMERS}, but transformers {version} is installed. "
            f'Install a supported release: pip install "transformers{SUPPORTED_TRANSFORMERS}".'
        )


def _detect_cache_kwarg() -> str:
    """``"cache"`` where the installed transformers uses the 5.24 name, else ``"past_key_values"``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


require_supported_transformers()

#: Name of the key/value cache argument and output field in the installed transformers.
CACHE_KWARG: str = _detect_cache_kwarg()


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{CACHE_KWARG: cache}``, to pass a cache to a transformers ``forward`` or ``generate``."""
    return {CACHE_KWARG: cache}


def output_cache(outputs: Any) -> Any:
    """The key/value cache of a transformers ``ModelOutput`` (``None`` when it has none)."""
    return getattr(outputs, CACHE_KWARG, None)


def pop_cache_argument(cache: Any, kwargs: dict[str, Any], caller: str | None = None) -> Any:
    """Merge the cache given under either name (``cache`` or the older ``past_key_values``).

    ``generate`` of transformers < 5.24 passes ``past_key_values``, later releases ``cache``; a user may
    pass either. Removes ``past_key_values`` from ``kwargs`` and returns the one cache (or ``None``).

    With a ``caller`` (``"ClipCapForConditionalGeneration.forward"``), the old name gives the ``FutureWarning``
    that transformers' models give for it (``deprecate_kwarg``: "`past_key_values` is deprecated ... Use `cache`
    instead."), but only where the installed transformers has the new name (>= 5.24): before, ``past_key_values``
    is the current name, and ``generate`` itself passes it.
    """
    if "past_key_values" not in kwargs:
        return cache
    legacy = kwargs.pop("past_key_values")
    if cache is not None and legacy is not None:
        raise ValueError("Pass the key/value cache once: as `cache` or as `past_key_values`, not both.")
    if CACHE_KWARG == "cache" and caller is not None:
        warnings.warn(
            f"`past_key_values` is deprecated for `{caller}` since transformers 5.24 renamed it. Use `cache` "
            "instead.",
            FutureWarning,
            stacklevel=3,
        )
    return cache if cache is not None else legacy


def _logits_processor_hook_parameters() -> tuple[str, ...] | None:
    from transformers import GenerationMixin

    hook = getattr(GenerationMixin, "_get_logits_processor", None)
    if hook is None or not callable(hook):
        return None
    return tuple(inspect.signature(hook).parameters)


#: Parameters the private ``GenerationMixin._get_logits_processor`` had in the releases this code was
#: tested with. If the installed release changed them, the speed path that overrides it is switched off.
_EXPECTED_HOOK_PARAMETERS = ("self", "generation_config", "input_ids_seq_length")


def logits_processor_hook_available() -> bool:
    """Whether ``GenerationMixin._get_logits_processor`` is where, and shaped as, this code expects."""
    params = _logits_processor_hook_parameters()
    return params is not None and params[: len(_EXPECTED_HOOK_PARAMETERS)] == _EXPECTED_HOOK_PARAMETERS


LOGITS_PROCESSOR_HOOK_AVAILABLE: bool = logits_processor_hook_available()


def _slice_logits_to_keep_fallback(hidden_states: Any, logits_to_keep: Any) -> Any:
    """What ``slice_logits_to_keep`` does for an int (last N positions, 0 = all) or a 1-D index tensor."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
    return hidden_states[:, logits_to_keep]


try:  # transformers >= 5.24 (before, each model sliced by hand)
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:
    slice_logits_to_keep = _slice_logits_to_keep_fallback


def allow_compile_on_all_devices(compile_config: Any) -> bool:
    """Let ``generate`` compile its decoding step on any device (by default transformers compiles on GPUs only).

    Sets the private ``CompileConfig._compile_all_devices`` (5.20-5.25: there is no public switch). Returns False
    where a release dropped it: ``generate`` then warns that it cannot compile and decodes eagerly (same tokens).
    """
    if not hasattr(compile_config, "_compile_all_devices"):
        return False
    compile_config._compile_all_devices = True
    return True


def _onednn_ops() -> tuple[Any, Any] | None:
    """torch's oneDNN linear ops (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, private:
    what Inductor emits for low-precision linear layers), or None where this torch build lacks them."""
    import torch

    try:
        if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
            return None
        reorder = torch.ops.mkldnn._reorder_linear_weight
        linear = torch.ops.mkldnn._linear_pointwise
        weight, x = torch.ones(3, 2), torch.ones(1, 2)
        if not torch.equal(linear(x, reorder(weight, 1), None, "none", [], ""), torch.full((1, 3), 2.0)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return reorder, linear


def onednn_linear_ops() -> tuple[Any, Any] | None:
    """``(pack, linear)`` for CPU linear layers through oneDNN, or None where the installed torch lacks them.

    ``pack(weight (O, I), batch_hint) -> packed``; ``linear(x (..., I), packed, bias (O,) or None) -> (..., O)``.
    Used by :mod:`modeling_clipcap.cpu_linear` (opt-in); where None, that module leaves every layer as it is.
    """
    if "ops" not in _ONEDNN:
        _ONEDNN["ops"] = _onednn_ops()
    ops = _ONEDNN["ops"]
    if ops is None:
        return None
    reorder, linear = ops
    return reorder, lambda x, packed, bias: linear(x, packed, bias, "none", [], "")


_ONEDNN: dict[str, Any] = {}


def register_key_renames(class_name: str, renames: dict[str, str]) -> bool:
    """Register checkpoint key renames (regex -> replacement) applied when ``class_name`` loads weights.

    Uses ``transformers.conversion_mapping.register_checkpoint_conversion_mapping`` (5.20-5.24): loading
    renames old keys, and ``save_pretrained`` writes the old names back (``save_original_format``), so saved
    files keep one layout. Returns False where that API is missing; the caller then passes ``key_mapping``.
    """
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return False
    mapping = [WeightRenaming(source_patterns=old, target_patterns=new) for old, new in renames.items()]
    register_checkpoint_conversion_mapping(class_name, mapping, overwrite=True)
    return True


__all__ = [
    "CACHE_KWARG",
    "LOGITS_PROCESSOR_HOOK_AVAILABLE",
    "MINIMUM_TRANSFORMERS",
    "SUPPORTED_TRANSFORMERS",
    "allow_compile_on_all_devices",
    "cache_kwargs",
    "logits_processor_hook_available",
    "onednn_linear_ops",
    "output_cache",
    "pop_cache_argument",
    "register_key_renames",
    "require_supported_transformers",
    "slice_logits_to_keep",
]
