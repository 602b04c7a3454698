"""Hub concerns in one place: model cards (``huggingface_hub.ModelCard``) and pushing a model folder.

Every card this package writes comes from here: the trained model's (:func:`render_training_card`), the
converted checkpoint's (:func:`render_conversion_card`) and the evaluation table ``clipcap evaluate
--update_model_card`` puts into an existing card (:func:`update_model_card`, with ``model-index`` results).
Templates are a preset's ``README.md`` / ``conversion_card.md`` (:mod:`modeling_clipcap.presets`, one schema for
every preset) with ``$name`` placeholders; :func:`fill_card` fills them and returns a ``ModelCard`` (metadata
parsed, so results can be added to it later). :func:`push_folder` is the one upload, for training and
conversion alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard

from .caption_metrics import TABLE_COLUMNS

# ---------------------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------------------

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


CONVERSION_CARD_TEMPLATE = (
    "---\nlibrary_name: transformers\npipeline_tag: image-to-text\ntags:\n  - clipcap\n  - converted\n---\n\n"
    "# ClipCap (converted original checkpoint)\n\nConverted from `${source_file}` (sha256 `${source_sha256}`)"
    " on ${converted_on} with modeling_clipcap ${package_version}, transformers ${transformers_version}."
    "\n\nVision tower: ${vision_source}. GPT-2 config / tokenizer: ${text_source}.\n\n${settings_table}\n\n"
    '## Usage\n\n${usage}\n\nDecoding stops at the "." token${eos_note}.\n'
)
"""The card of a conversion without a preset card (a preset's ``conversion_card.md``, else its ``README.md``, is
the template otherwise)."""

# Settings of the transformer mapper only: an MLP mapper's card leaves them out.
_TRANSFORMER_MAPPER_FIELDS = ("clip_length", "mapping_num_layers", "mapping_num_heads", "mapping_mlp_ratio")


def _conversion_usage(config: Any, location: str, has_tokenizer: bool) -> str:
    """The converted model card's usage snippet: images through the processor, or ``image_embeds`` without a
    tower."""
    if config.vision_config is not None:
        usage = (
            "```python\nimport modeling_clipcap  # or pass trust_remote_code=True below\n"
            "from PIL import Image\nfrom transformers import AutoModel, AutoProcessor\n\n"
            f'model = AutoModel.from_pretrained("{location}")\n'
            f'processor = AutoProcessor.from_pretrained("{location}")\n'
            'inputs = processor(images=[Image.open("photo.jpg")], return_tensors="pt")\n'
            "ids = model.generate(**inputs)  # beam 5, stops at '.'\n"
            "print(processor.batch_decode(ids))\n```"
        )
    else:
        usage = (
            "```python\nimport modeling_clipcap  # or pass trust_remote_code=True below\n"
            "from transformers import AutoModel, AutoTokenizer\n\n"
            f'model = AutoModel.from_pretrained("{location}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")\n'
            f"# image_embeds: (batch, {config.image_embed_dim}) float tensor from the image encoder named above\n"
            "ids = model.generate(image_embeds=image_embeds)\n"
            "print(tokenizer.batch_decode(ids, skip_special_tokens=True))\n```"
        )
    if not has_tokenizer:
        usage += (
            "\n\nNo tokenizer was bundled at conversion: decode with GPT-2's tokenizer "
            "(`AutoTokenizer.from_pretrained(<a local copy of gpt2>)`)."
        )
    return usage


def render_conversion_card(
    model: Any,
    *,
    config_fields: Sequence[str],
    source_file: str,
    source_sha256: str,
    vision_source: str,
    text_source: str,
    repo_id: str | None = None,
    has_tokenizer: bool = True,
    card_template: str | None = None,
) -> ModelCard:
    """The card ``clipcap convert`` writes: ``card_template`` (a preset's ``conversion_card.md`` or
    ``README.md``; ``None``: :data:`CONVERSION_CARD_TEMPLATE`) filled with the checkpoint's provenance, the
    model's settings and a usage snippet.

    Args:
        model: the converted ``ClipCapForConditionalGeneration`` (its config and generation config are shown).
        config_fields: the ClipCap config fields to list in the settings table (the transformer mapper's own
            are left out for an MLP mapper).
        source_file, source_sha256: the original checkpoint's file name and digest.
        vision_source, text_source: where the vision tower and the GPT-2 config / tokenizer came from.
        repo_id: the Hub repository the usage snippet loads from (``None``: a placeholder path).
        has_tokenizer: whether a tokenizer was saved with the model (the snippet says how to decode otherwise).
    """
    import transformers

    from . import __version__

    config = model.config
    location = repo_id or "path/to/converted-model"
    eos = model.generation_config.eos_token_id
    eos_note = (
        " and also at GPT-2's `<|endoftext|>` (which the original would have decoded past)"
        if isinstance(eos, list) and len(eos) > 1
        else ""
    )
    settings = {
        f"`{key}`": f"`{json.dumps(getattr(config, key))}`"
        for key in config_fields
        if not (key in _TRANSFORMER_MAPPER_FIELDS and config.mapping_type == "mlp")
    }
    settings["generation `eos_token_id`"] = f"`{json.dumps(eos)}`"
    values = {
        "prefix_length": str(config.prefix_length),
        "source_file": source_file,
        "source_sha256": source_sha256,
        "converted_on": _dt.date.today().isoformat(),
        "package_version": __version__,
        "transformers_version": transformers.__version__,
        "vision_source": vision_source,
        "text_source": text_source,
        "settings_table": "| setting | value |\n|---|---|\n" + markdown_rows(settings),
        "usage": _conversion_usage(config, location, has_tokenizer),
        "eos_note": eos_note,
        "model_id": location,
    }
    return fill_card(card_template if card_template is not None else CONVERSION_CARD_TEMPLATE, values)


# The evaluation table of a card sits between these markers, so a later run replaces it.
MODEL_CARD_START = "<!-- clipcap-evaluate:start -->"
MODEL_CARD_END = "<!-- clipcap-evaluate:end -->"


def update_model_card(
    model_dir: str | os.PathLike,
    table: str,
    heading: str = "## Evaluation",
    metrics: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    split: str | None = None,
) -> Path:
    """Put ``table`` into ``model_dir/README.md`` between the evaluate markers (replacing an earlier table).

    Creates the README when missing and appends an evaluation section when it has no markers. With
    ``metrics`` and ``dataset_name``, the card's YAML metadata also gets ``model-index`` results (task
    ``image-to-text``, one entry per computed metric, scores x100 as in the table) through
    ``huggingface_hub.ModelCard``, so the Hub shows them; earlier results for the same dataset and split are
    replaced, other metadata and results are kept. Returns the README path.
    """
    readme = Path(model_dir) / "README.md"
    block = f"{MODEL_CARD_START}\n{table.rstrip()}\n{MODEL_CARD_END}"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if MODEL_CARD_START in text and MODEL_CARD_END in text:
        head, rest = text.split(MODEL_CARD_START, 1)
        _, tail = rest.split(MODEL_CARD_END, 1)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + f"{heading}\n\n{block}\n"
    if metrics is not None and dataset_name:
        text = _with_model_index(text, metrics, dataset_name, split, Path(model_dir).resolve().name)
    readme.write_text(text, encoding="utf-8")
    return readme


def _with_model_index(
    text: str, metrics: Mapping[str, Any], dataset_name: str, split: str | None, model_name: str
) -> str:
    """``text`` (a model card) with its ``model-index`` results for ``dataset_name``/``split`` replaced."""
    card = ModelCard(text)
    kept = [
        result
        for result in (card.data.eval_results or [])
        if not (result.dataset_name == dataset_name and result.dataset_split == split)
    ]
    for key, label in TABLE_COLUMNS:
        value = metrics.get(key)
        if value is None:
            continue
        kept.append(
            EvalResult(
                task_type="image-to-text",
                task_name="Image Captioning",
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=key.lower(),
                metric_name=label,
                metric_value=round(100 * float(value), 2),
            )
        )
    card.data.eval_results = kept or None
    card.data.model_name = card.data.model_name or model_name
    return str(card)


# ---------------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------------

# Never uploaded with a model: training checkpoints, temporary folders, tracker logs.
PUSH_IGNORE_PATTERNS = ["checkpoints/**", "checkpoints/*", "*.tmp*", "runs/**"]


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


# ---------------------------------------------------------------------------------------------------------
# The model and processor to train
# ---------------------------------------------------------------------------------------------------------


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
    "CONVERSION_CARD_TEMPLATE",
    "MODEL_CARD_END",
    "MODEL_CARD_START",
    "PUSH_IGNORE_PATTERNS",
    "TRAINING_CARD_TEMPLATE",
    "fill_card",
    "load_training_model",
    "load_training_processor",
    "markdown_rows",
    "push_folder",
    "render_conversion_card",
    "render_training_card",
    "update_model_card",
]
