"""The transformers adapter (``modeling_clipcap/compat.py``): version gate, cache name, private hook."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import transformers
from conftest import tiny_clipcap_config
from transformers import GenerationMixin

from modeling_clipcap import ClipCapForConditionalGeneration, ClipCapOutput, compat
from modeling_clipcap.modeling_clipcap import EosSuppressionUntilLength


@pytest.mark.parametrize("version", ["4.57.6", "5.19.0", "6.0.0", "6.1.0.dev0"])
def test_unsupported_transformers_gets_one_clear_error(version):
    with pytest.raises(ImportError, match=r"transformers >=5\.20\.0,<6.*pip install"):
        compat.require_supported_transformers(version)


@pytest.mark.parametrize("version", ["5.20.0", "5.24.0", "5.99.1.dev0", "5.23.0+local"])
def test_supported_transformers_passes(version):
    compat.require_supported_transformers(version)


@pytest.mark.parametrize(
    "version", ["5.19.99", "5.20.0", "5.20.1", "5.25.0", "5.999.0", "6.0.0", "6.0.0rc1", "7.1.0", "4.99.0"]
)
def test_the_gate_is_the_range_pyproject_declares(version):
    """compat's range and pyproject.toml's transformers requirement are one range: the gate accepts exactly the
    releases pip may install (checked on both sides of each bound)."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (declared,) = [
        Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "transformers"
    ]
    allowed = declared.specifier.contains(version, prereleases=True)
    if allowed:
        compat.require_supported_transformers(version)
    else:
        with pytest.raises(ImportError, match=r"transformers >=5\.20\.0,<6"):
            compat.require_supported_transformers(version)


@pytest.mark.parametrize("version, refused", [("5.19.0", True), ("6.0.0", True), ("5.20.0", False)])
def test_importing_the_adapter_runs_the_gate(version, refused, monkeypatch):
    """The check runs when the module is imported (as by a saved model's code under the user's transformers):
    a fresh copy of compat.py executed under a faked transformers version refuses to import outside the range."""
    import importlib.util
    import sys

    # the module object an ``import transformers`` gives now (transformers may have replaced the one imported above)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    spec = importlib.util.spec_from_file_location("clipcap_compat_probe", compat.__file__)
    module = importlib.util.module_from_spec(spec)
    if refused:
        with pytest.raises(ImportError, match=rf"transformers {re.escape(version)} is installed"):
            spec.loader.exec_module(module)
    else:
        spec.loader.exec_module(module)
        assert module.CACHE_KWARG == compat.CACHE_KWARG


def test_cache_name_matches_the_installed_transformers():
    """5.24 renamed ``past_key_values`` to ``cache``; the adapter must name what the installed GPT-2 takes."""
    import inspect

    from transformers import GPT2Model

    params = inspect.signature(GPT2Model.forward).parameters
    assert compat.CACHE_KWARG in params, (
        f"transformers {transformers.__version__}: GPT-2 forward takes none of the cache names "
        f"({list(params)}); update modeling_clipcap/compat.py"
    )
    fields = {f.name for f in dataclasses.fields(ClipCapOutput)}
    assert compat.CACHE_KWARG in fields
    assert {"prefix_embeds", "image_embeds", "logits", "loss"} <= fields


def test_forward_returns_and_accepts_the_cache_under_both_names(tiny_tokenizer, recwarn):
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(
        tiny_clipcap_config(len(tiny_tokenizer), with_vision=False)
    ).eval()
    embeds = torch.randn(2, 24)
    ids = torch.tensor([[5, 6], [7, 8]])
    with torch.no_grad():
        first = model(image_embeds=embeds, input_ids=ids[:, :1], use_cache=True)
        cache = compat.output_cache(first)
        assert cache is not None and cache.get_seq_length() == model.config.prefix_length + 1
        step = model(input_ids=ids[:, 1:], cache=cache, attention_mask=torch.ones(2, 6, dtype=torch.long))
        full = model(image_embeds=embeds, input_ids=ids)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
        # the pre-5.24 name still works for callers that use it; where transformers renamed it, with the
        # FutureWarning transformers' models give (tests/test_transformers_conventions.py checks it in full)
        again = model(image_embeds=embeds, input_ids=ids[:, :1], use_cache=True)
        legacy_kwargs = dict(
            input_ids=ids[:, 1:],
            past_key_values=compat.output_cache(again),
            attention_mask=torch.ones(2, 6, dtype=torch.long),
        )
        if compat.CACHE_KWARG == "cache":
            with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
                legacy = model(**legacy_kwargs)
        else:
            legacy = model(**legacy_kwargs)
        torch.testing.assert_close(legacy.logits, step.logits)
        with pytest.raises(ValueError, match="not both"):
            model(input_ids=ids[:, 1:], cache=cache, past_key_values=cache)
    deprecations = [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]


def test_logits_processor_hook_is_where_the_speed_path_expects_it(tiny_tokenizer, monkeypatch):
    """Fails the day transformers moves ``GenerationMixin._get_logits_processor``: the in-place EOS speed path
    then silently falls back to the stock processors (same tokens, slower), and this test names the release."""
    assert compat.logits_processor_hook_available(), (
        f"transformers {transformers.__version__} moved or reshaped GenerationMixin._get_logits_processor; "
        "the CPU EOS speed path is off (stock processors run). Update modeling_clipcap/compat.py."
    )
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(
        tiny_clipcap_config(len(tiny_tokenizer), with_vision=False)
    ).eval()
    calls = []
    original = EosSuppressionUntilLength.__call__
    monkeypatch.setattr(
        EosSuppressionUntilLength, "__call__", lambda self, i, s: calls.append(1) or original(self, i, s)
    )
    model.generate(image_embeds=torch.randn(1, 24), max_new_tokens=3, min_new_tokens=2, pad_token_id=0)
    assert calls, f"transformers {transformers.__version__}: generate no longer calls _get_logits_processor"


def test_without_the_private_hook_generation_falls_back_to_stock_processors(tiny_tokenizer, monkeypatch):
    """Simulate a release without ``_get_logits_processor`` on the model: same tokens, no crash."""
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(
        tiny_clipcap_config(len(tiny_tokenizer), with_vision=False)
    ).eval()
    embeds = torch.randn(3, 24)
    kwargs = dict(max_new_tokens=5, min_new_tokens=4, num_beams=2, pad_token_id=0)
    expected = model.generate(image_embeds=embeds, **kwargs)
    # The stock hook, as if ClipCap's override were gone (a release that moved the hook never calls it).
    monkeypatch.setattr(
        ClipCapForConditionalGeneration, "_get_logits_processor", GenerationMixin._get_logits_processor
    )
    assert torch.equal(model.generate(image_embeds=embeds, **kwargs), expected)


def test_the_suite_turns_transformers_deprecation_notices_into_failures(pytester):
    """The conftest guard is live: a test that triggers transformers' logged rename notice fails."""
    from pathlib import Path

    tests_dir = Path(__file__).parent
    pytester.makeconftest(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {str(tests_dir)!r})
        spec = importlib.util.spec_from_file_location("clipcap_conftest", {str(tests_dir / "conftest.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        no_transformers_deprecation_notices = module.no_transformers_deprecation_notices
        """
    )
    pytester.makepyfile(
        test_probe="""
        from transformers.utils import logging
        def test_probe():
            logging.get_logger("transformers.probe").warning("`past_key_values` is deprecated. Use `cache`.")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    assert "deprecation notice" in result.stdout.str()


def test_compile_config_still_has_the_cpu_switch():
    """``compat.allow_compile_on_all_devices`` (used by ``compiled_decoding.compiled_decoding_kwargs``) sets
    ``CompileConfig._compile_all_devices`` (private, no public switch) to compile the decoding step on CPU; this
    names the release that drops it."""
    from transformers import CompileConfig

    assert hasattr(CompileConfig(), "_compile_all_devices"), (
        f"transformers {transformers.__version__} dropped CompileConfig._compile_all_devices: update the "
        "compat.allow_compile_on_all_devices and docs/compatibility.md"
    )


def test_checkpoint_key_renames_register_on_this_transformers():
    """0.1.0 checkpoints name the tower and mapper ``vision_model.*`` / ``mapping_network.*``; the model maps
    them to ``model.*`` through transformers' conversion-mapping registry (internal module, 5.20-5.24)."""
    from modeling_clipcap.modeling_clipcap import LEGACY_KEY_RENAMES

    assert compat.register_key_renames("ClipCapForConditionalGeneration", LEGACY_KEY_RENAMES), (
        f"transformers {transformers.__version__} moved transformers.conversion_mapping."
        "register_checkpoint_conversion_mapping / core_model_loading.WeightRenaming: loading falls back to "
        "from_pretrained(key_mapping=...), and saved files get the new key names; update compat.py"
    )


def test_old_checkpoints_load_without_the_conversion_registry(tmp_path):
    """The fallback when the registry is gone: ``from_pretrained(key_mapping=...)`` still reads 0.1.0 files."""
    import json
    from pathlib import Path

    from test_auto_and_remote import run_without_package

    folder = Path(__file__).parent / "fixtures" / "saved_models" / "release-0.1.0" / "mlp"
    code = f"""
    import sys
    sys.meta_path.pop(0)  # the package is importable again: this test needs it
    import json, torch, transformers.modeling_utils, transformers.conversion_mapping as registry
    del registry.register_checkpoint_conversion_mapping  # a release without the registry
    from safetensors.torch import load_file
    import modeling_clipcap
    from modeling_clipcap import compat, ClipCapForConditionalGeneration
    assert not compat.register_key_renames("X", {{"a": "b"}})
    model = ClipCapForConditionalGeneration.from_pretrained({str(folder)!r}).eval()
    e = load_file({str(folder / "expected.safetensors")!r})
    with torch.no_grad():
        logits = model(pixel_values=e["pixel_values"], input_ids=e["input_ids"]).logits
    print(json.dumps(float((logits - e["logits"]).abs().max())))
    """
    proc = run_without_package(code, cwd=tmp_path)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.parametrize("keep", [0, 1, 3, torch.tensor([0, 2])])
def test_slice_logits_to_keep_fallback_matches_transformers(keep):
    hidden = torch.randn(2, 5, 4)
    fallback = compat._slice_logits_to_keep_fallback(hidden, keep)
    expected = (
        {0: hidden, 1: hidden[:, -1:], 3: hidden[:, -3:]}.get(keep)
        if isinstance(keep, int)
        else hidden[:, keep]
    )
    assert torch.equal(fallback, expected)
    assert torch.equal(compat.slice_logits_to_keep(hidden, keep), expected)
