"""modeling_clipcap.hub: the cards of training, conversion and evaluation, and the one push (local Hub emulation)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_clipcap_config
from huggingface_hub import ModelCard

from modeling_clipcap import hub


def test_push_folder_uploads_the_model_without_checkpoints_and_resolves_the_namespace(hub_server, tmp_path):
    folder = tmp_path / "model"
    (folder / "checkpoints" / "step_10").mkdir(parents=True)
    (folder / "checkpoints" / "step_10" / "model.safetensors").write_bytes(b"0" * 16)
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_text("log")
    (folder / "config.json").write_text('{"model_type": "clipcap"}')
    (folder / "config.json.tmp123").write_text("partial")
    (folder / "README.md").write_text("# card\n")
    code = (
        "from modeling_clipcap.hub import push_folder\n"
        f"print(push_folder({str(folder)!r}, 'tiny-push', private=True, commit_message='my message'))\n"
    )
    proc = hub_server.run_python(code)
    assert proc.returncode == 0, proc.stderr
    repo_id = f"{hub_server.user}/tiny-push"  # a name without a namespace goes to the token's user
    assert proc.stdout.strip().splitlines()[-1] == repo_id
    assert sorted(hub_server.files(repo_id)) == [".gitattributes", "README.md", "config.json"]
    assert hub_server.repo(repo_id).private is True
    assert hub_server.history(repo_id)[0].title == "my message"
    hub_server.assert_all_handled()


def test_update_model_card_replaces_its_own_section_and_results(tmp_path):
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    metrics = {"Bleu_4": 0.25, "CIDEr": 1.1, "skipped": {"SPICE": "not requested"}}
    readme = hub.update_model_card(model_dir, "| t1 |\n", metrics=metrics, dataset_name="coco", split="test")
    card = ModelCard(readme.read_text())
    assert card.text.startswith("## Evaluation") and "| t1 |" in card.text
    assert card.data.model_name == "tiny-model"
    assert {(r.metric_type, r.metric_name, r.metric_value) for r in card.data.eval_results} == {
        ("bleu_4", "BLEU-4", 25.0),
        ("cider", "CIDEr", 110.0),
    }

    # text around the markers stays, the table and this split's results are replaced, others stay
    text = readme.read_text().replace("## Evaluation", "# Mine\n\nIntro.\n\n## Evaluation") + "\nAfter.\n"
    readme.write_text(text)
    hub.update_model_card(model_dir, "| t2 |", metrics={"CIDEr": 0.5}, dataset_name="coco", split="val")
    hub.update_model_card(model_dir, "| t3 |", metrics={"CIDEr": 0.9}, dataset_name="coco", split="test")
    card = ModelCard(readme.read_text())
    assert "Intro." in card.text and card.text.rstrip().endswith("After.")
    assert card.text.count(hub.MODEL_CARD_START) == 1 and "| t3 |" in card.text and "| t1 |" not in card.text
    assert sorted((r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results) == [
        ("test", "cider", 90.0),
        ("val", "cider", 50.0),
    ]
    # no metrics: the table only, the metadata as it was
    hub.update_model_card(model_dir, "| t4 |")
    assert len(ModelCard(readme.read_text()).data.eval_results) == 2


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_conversion_card_lists_the_settings_of_its_mapper(tiny_tokenizer, mapping_type):
    from transformers import GenerationConfig

    from modeling_clipcap import ClipCapForConditionalGeneration

    config = tiny_clipcap_config(len(tiny_tokenizer), mapping_type=mapping_type, with_vision=False)
    model = ClipCapForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=[3, 4])
    fields = ("mapping_type", "prefix_length", "clip_length", "mapping_num_layers", "image_embed_dim")
    card = hub.render_conversion_card(
        model,
        config_fields=fields,
        source_file="coco_weights.pt",
        source_sha256="abc123",
        vision_source="none",
        text_source="GPT-2 small",
        has_tokenizer=False,
    )
    text = str(card)
    assert card.data.library_name == "transformers" and "converted" in card.data.tags
    assert "`coco_weights.pt` (sha256 `abc123`)" in text and "${" not in text
    assert f'| `mapping_type` | `"{mapping_type}"` |' in text and "| `image_embed_dim` | `24` |" in text
    assert ("| `clip_length` | `3` |" in text) == (mapping_type == "transformer")
    assert ("| `mapping_num_layers` | `2` |" in text) == (mapping_type == "transformer")
    assert "| generation `eos_token_id` | `[3, 4]` |" in text and "also at GPT-2's `<|endoftext|>`" in text
    # no tower: the snippet passes image_embeds of the model's width; no tokenizer: it says how to decode
    assert "(batch, 24)" in text and "path/to/converted-model" in text and "No tokenizer was bundled" in text
    assert json.dumps(mapping_type) in text


@pytest.mark.parametrize(
    "name, module",
    [
        ("compute_caption_metrics", "caption_metrics"),
        ("simple_tokenize", "caption_metrics"),
        ("compute_clip_score", "clip_score"),
        ("load_clip", "clip_score"),
        ("clip_score_from_embeddings", "clip_score"),
        ("ref_clip_score_from_embeddings", "clip_score"),
    ],
)
def test_metric_names_the_docs_showed_under_evaluation_still_import_with_a_warning(name, module):
    import importlib

    from modeling_clipcap import evaluation

    with pytest.warns(FutureWarning, match=f"modeling_clipcap.{module}.{name}"):
        moved = getattr(evaluation, name)
    assert moved is getattr(importlib.import_module(f"modeling_clipcap.{module}"), name)
    with pytest.raises(AttributeError):
        evaluation.spice_dir  # noqa: B018  (never documented there: no forwarding)
