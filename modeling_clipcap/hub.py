"""Hub concerns in one place: model cards (``huggingface_hub.ModelCard``) and pushing a model folder.

Model-card templates are the preset's ``README.md`` (:mod:`modeling_clipcap.presets`, one schema for every
preset) with ``$name`` placeholders; :func:`fill_card` fills them and returns a ``ModelCard`` (metadata parsed,
so ``clipcap evaluate --update_model_card`` can add results to it later).
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import HfApi, ModelCard

# Never uploaded with a model: training checkpoints, temporary folders, tracker logs.
PUSH_IGNORE_PATTERNS = ["checkpoints/**", "checkpoints/*", "*.tmp*", "runs/**"]

TRAINING_CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-to-text
tags:
- clipcap
- image-captioning
---

# $model_id

A ClipCap image captioner (image tower -> $mapping_type mapping network -> a prefix of $prefix_length
vectors -> causal language model), trained with `training/train.py` of the `modeling_clipcap` package.

- Base models: $base_models
- Training data: $training_data
- Language model frozen: $freeze_language_model; trainable parameters: $trainable_parameters
- Optimizer steps: $train_steps; final training loss: $final_loss

## Use

```python
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("$model_id", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("$model_id", trust_remote_code=True)
inputs = processor(images=[image], return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs), skip_special_tokens=True))
```

## Training hyper-parameters

| name | value |
|---|---|
$hyperparameters

## Validation metrics

| metric | value |
|---|---|
$metrics
"""


def fill_card(template: str, values: Mapping[str, Any]) -> ModelCard:
    """``template`` with its ``$name`` placeholders replaced by ``values`` (unknown ones left as they are)."""
    return ModelCard(string.Template(template).safe_substitute(values))


def markdown_rows(values: Mapping[str, Any], number_format: str | None = None) -> str:
    """``| name | value |`` table rows, one per entry (``number_format`` applied to numbers when given)."""
    return "\n".join(
        f"| {k} | {format(v, number_format) if number_format and isinstance(v, (int, float)) else v} |"
        for k, v in values.items()
    )


def render_training_card(
    summary: Mapping[str, Any],
    config: Any,
    *,
    model_id: str,
    base_models: Sequence[str | None] = (),
    card_template: str | None = None,
) -> ModelCard:
    """The card ``training/train.py`` writes: ``card_template`` (a preset's ``README.md``; ``None``:
    :data:`TRAINING_CARD_TEMPLATE`) filled with the run's base models, data, hyper-parameters and validation
    metrics.

    Args:
        summary: the run's summary (``hyperparameters``, ``training_data``, ``trainable_parameters``,
            ``completed_steps``, optional ``final_metrics`` and ``final_train_loss``).
        config: the trained model's ``ClipCapConfig``.
        model_id: the Hub repository or folder name the card calls the model by.
        base_models: the checkpoints the model was built from (``None`` entries are left out).
    """
    template = card_template or TRAINING_CARD_TEMPLATE
    hyper = {k: v for k, v in sorted(summary["hyperparameters"].items()) if v is not None}
    metrics = {k: v for k, v in (summary.get("final_metrics") or {}).items() if isinstance(v, (int, float))}
    final_loss = summary.get("final_train_loss")
    values = {
        "model_id": model_id,
        "training_data": summary["training_data"],
        "base_models": ", ".join(x for x in base_models if x)
        or "trained from scratch (random initialisation)",
        "mapping_type": config.mapping_type,
        "prefix_length": config.prefix_length,
        "freeze_language_model": config.freeze_language_model,
        "trainable_parameters": f"{summary['trainable_parameters']:,}",
        "hyperparameters": markdown_rows(hyper),
        "metrics": markdown_rows(metrics, ".4f") or "| (no validation run) | |",
        "train_steps": summary["completed_steps"],
        "final_loss": f"{final_loss:.4f}" if final_loss is not None else "n/a",
    }
    return fill_card(template, values)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload ClipCap model",
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (without checkpoints); returns the repo id."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS,
    )
    return repo_id


# Keys of a saved config.json that are not ClipCap fields to pass on.
_SAVED_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")


def load_training_model(
    *,
    model_name_or_path: str | None = None,
    vision_model_name_or_path: str | None = None,
    text_model_name_or_path: str | None = None,
    preset_config: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """The model to train, from (in this order) a ClipCap checkpoint, an image-tower + causal-LM pair of
    checkpoints (``from_vision_text_pretrained``), or a preset's full ``config.json`` (random weights).

    ``overrides`` are ClipCap config fields (``mapping_type``, ``prefix_length``, ``freeze_*``...); on a trained
    checkpoint only the ``freeze_*`` ones may change (its architecture is fixed), others raise ValueError.
    """
    from .configuration_clipcap import ClipCapConfig
    from .modeling_clipcap import ClipCapForConditionalGeneration

    preset_config, overrides = dict(preset_config or {}), dict(overrides or {})
    if model_name_or_path:
        model = ClipCapForConditionalGeneration.from_pretrained(model_name_or_path)
        for key, value in overrides.items():
            if key in ("freeze_language_model", "freeze_vision"):
                setattr(model.config, key, value)
            elif getattr(model.config, key) != value:
                raise ValueError(
                    f"--{key}={value} differs from {model_name_or_path}'s {key}={getattr(model.config, key)}; "
                    "a trained model's architecture cannot change. Drop the flag."
                )
        model.language_model.requires_grad_(not model.config.freeze_language_model)
        if model.vision_model is not None:
            model.vision_model.requires_grad_(not model.config.freeze_vision)
        model._apply_freezing()
        return model
    if text_model_name_or_path:
        fields = {
            k: v
            for k, v in preset_config.items()
            if k in ClipCapConfig.__dataclass_fields__
            and k not in ("vision_config", "text_config", *_SAVED_CONFIG_KEYS)
        }
        return ClipCapForConditionalGeneration.from_vision_text_pretrained(
            vision_model_name_or_path, text_model_name_or_path, **(fields | overrides)
        )
    if preset_config.get("text_config") is not None:
        fields = {k: v for k, v in preset_config.items() if k not in _SAVED_CONFIG_KEYS}
        return ClipCapForConditionalGeneration(ClipCapConfig(**(fields | overrides)))
    raise ValueError(
        "No model to train: give --model_name_or_path (a ClipCap checkpoint), or --text_model_name_or_path "
        "(a causal LM) with --vision_model_name_or_path (an image tower), or a --config preset whose "
        "config.json has vision_config and text_config."
    )


def load_training_processor(
    model: Any,
    *,
    tokenizer_sources: tuple[str | os.PathLike | None, ...],
    image_processor_name: str | None = None,
    image_processor_sources: tuple[str | os.PathLike | None, ...] = (),
) -> Any:
    """A ``ClipCapProcessor`` for ``model``: the tokenizer from the first of ``tokenizer_sources`` given,
    the image processor from ``image_processor_name`` (must load), else the first of
    ``image_processor_sources`` that has one, else the tower family's own image processor sized from its
    config (``towers.default_image_processor``: SigLIP's for SigLIP, ConvNeXt's for ConvNeXt and ResNet...)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil

    from .processing_clipcap import ClipCapProcessor
    from .towers import default_image_processor

    tokenizer_source = next((str(s) for s in tokenizer_sources if s), None)
    if tokenizer_source is None:
        raise ValueError(
            "No tokenizer: give --tokenizer_name (the language model's tokenizer folder or name)."
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_source} has no eos token; captions must end with one.")
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_source} has {len(tokenizer)} tokens but the language model's vocab_size is "
            f"{model.config.text_config.vocab_size}; use the matching tokenizer."
        )
    if image_processor_name:
        image_processor = AutoImageProcessor.from_pretrained(image_processor_name)
    else:
        image_processor = None
        for source in (s for s in image_processor_sources if s):
            try:
                image_processor = AutoImageProcessor.from_pretrained(str(source))
                break
            except (OSError, ValueError):
                continue
    if image_processor is None and model.config.vision_config is not None:
        image_processor = default_image_processor(model.config.vision_config)
    elif image_processor is None:  # embeddings only: no tower reads images; CLIP's defaults
        image_processor = CLIPImageProcessorPil()
    return ClipCapProcessor(image_processor=image_processor, tokenizer=tokenizer)


__all__ = [
    "load_training_model",
    "load_training_processor",
    "PUSH_IGNORE_PATTERNS",
    "TRAINING_CARD_TEMPLATE",
    "fill_card",
    "markdown_rows",
    "push_folder",
    "render_training_card",
]
