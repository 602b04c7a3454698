"""Caption metrics (pycocoevalcap after PTB), CLIPScore and the `evaluate` modules, offline."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_vision_config

from modeling_clipcap import caption_metrics as cm
from modeling_clipcap import clip_score as cs
from modeling_clipcap import evaluation as ev
from modeling_clipcap import hub

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="pycocoevalcap's PTB tokenizer and METEOR need java")

# Several images, several references each (different counts), case and punctuation that the PTB
# tokenizer normalises, one prediction identical to one of its references.
PREDICTIONS = {
    101: "A man riding a horse on the beach.",
    102: "two dogs playing in the park!",
    103: "A plate of food, with broccoli and rice.",
    104: "a cat sitting on a wooden table",
    105: "People walking down a city street.",
}
REFERENCES = {
    101: [
        "A MAN RIDING A HORSE ON THE BEACH.",
        "a person rides a horse near the ocean",
        "Horse and rider, on sand.",
    ],
    102: [
        "Two dogs play in a park.",
        "dogs running on the grass",
        "Two puppies playing together!",
        "a pair of dogs",
    ],
    103: ["a plate with broccoli, rice and meat.", "Food on a white plate."],
    104: ["A cat on a table.", "a grey cat sitting on a wooden table", "The cat sits; the table is wooden."],
    105: [
        "People walking down a busy city street.",
        "pedestrians on a sidewalk",
        "a crowd in the city",
        "Men and women walk.",
    ],
}


_REFERENCE_METEOR: list = []


@pytest.fixture(scope="module", autouse=True)
def _close_reference_meteor():
    yield
    while _REFERENCE_METEOR:
        cm._close_meteor(_REFERENCE_METEOR.pop())


def _direct_pycocoevalcap(predictions: dict, references: dict) -> tuple[dict, dict]:
    """The reference: pycocoevalcap's own classes, called as its COCOEvalCap does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    out, per = {}, {}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"Bleu_{n + 1}"], per[f"Bleu_{n + 1}"] = bleu[n], bleu_per[n]
    if not _REFERENCE_METEOR:  # one reference METEOR server for the module (its start-up takes ~10 s)
        _REFERENCE_METEOR.append(Meteor())
    out["METEOR"], per["METEOR"] = _REFERENCE_METEOR[0].compute_score(gts, res)
    out["ROUGE_L"], per["ROUGE_L"] = Rouge().compute_score(gts, res)
    out["CIDEr"], per["CIDEr"] = Cider().compute_score(gts, res)
    return out, {k: {m: float(per[m][i]) for m in per} for i, k in enumerate(gts)}


@pytest.fixture(scope="module")
def library_and_direct():
    if not HAS_JAVA:
        pytest.skip("needs java")
    ours = cm.compute_caption_metrics(PREDICTIONS, REFERENCES, per_image=True)
    direct, direct_per = _direct_pycocoevalcap(PREDICTIONS, REFERENCES)
    return ours, direct, direct_per


def _java_children() -> list[str]:
    """Command lines of this process's live child processes that run java (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            reference = {m.meteor_p.pid for m in _REFERENCE_METEOR}
            if "java" in cmd and state != "Z" and int(pid) not in reference:
                found.append(cmd)
    return found


# --------------------------------------------------------------------------- pycocoevalcap metrics


@needs_java
def test_metrics_equal_pycocoevalcap_called_directly(library_and_direct):
    ours, direct, direct_per = library_and_direct
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert key in ours, f"{key} missing from {sorted(ours)}"
        assert abs(ours[key] - float(direct[key])) <= 1e-12, (key, ours[key], direct[key])
    assert ours["tokenizer"] == "ptb"
    assert ours["num_images"] == 5 and ours["num_references"] == sum(len(r) for r in REFERENCES.values())
    assert set(ours["per_image"]) == set(PREDICTIONS)
    for image_id, scores in direct_per.items():
        for key, value in scores.items():
            assert abs(ours["per_image"][image_id][key] - value) <= 1e-12, (image_id, key)
    # scores are in pycocoevalcap's scale, not x100, and not degenerate on this fixture
    assert 0 < ours["Bleu_4"] < 1 and 0 < ours["METEOR"] < 1 and 0 < ours["ROUGE_L"] < 1 and ours["CIDEr"] > 0


@needs_java
def test_identical_caption_scores_one_and_meteor_closed(library_and_direct):
    ours, _, _ = library_and_direct
    # image 101's prediction equals its first reference up to case and punctuation
    per = ours["per_image"][101]
    assert per["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert per["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    assert per["METEOR"] == pytest.approx(1.0, abs=1e-6)
    assert _java_children() == [], "METEOR's java process was left running"


@needs_java
def test_single_reference_identical_candidate_bleu4_is_one():
    out = cm.compute_caption_metrics(
        {"x": "a dog runs across the green field."},
        {"x": ["A dog runs across the green field"]},
        meteor=False,
    )
    assert out["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert out["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert out["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    # one image only: every n-gram has document frequency 1 = log(1) idf, so CIDEr-D is 0 by definition
    assert out["CIDEr"] == 0.0
    wrong = cm.compute_caption_metrics(
        {"x": "a cat sleeps on a sofa"}, {"x": ["A dog runs across the green field"]}, meteor=False
    )
    assert wrong["Bleu_4"] < 1e-3


@needs_java
def test_ptb_normalises_case_and_punctuation_and_runs_quietly(capfd):
    plain = {k: " ".join(cm.simple_tokenize(v).split()) for k, v in PREDICTIONS.items()}
    noisy = {k: v.upper().replace(" ", " , ") + " !" for k, v in plain.items()}
    capfd.readouterr()
    a = cm.compute_caption_metrics(plain, REFERENCES, meteor=False, spice=False)
    b = cm.compute_caption_metrics(noisy, REFERENCES, meteor=False, spice=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", f"pycocoevalcap printed: {captured}"
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert a[key] == b[key], key


@needs_java
def test_line_breaks_inside_captions_do_not_shift_captions():
    # Java's tokenizer breaks lines on \r and \u2028: each caption must still score against its own refs
    preds = {1: "a red\rbus", 2: "a green\u2028tree", 3: "a blue car"}
    refs = {1: ["a red bus"], 2: ["a green tree"], 3: ["a blue car"]}
    out = cm.compute_caption_metrics(preds, refs, meteor=False, spice=False, per_image=True)
    for key in refs:
        assert out["per_image"][key]["ROUGE_L"] == pytest.approx(1.0), key


# A stand-in for `java` (run by our code as a separate process): `-version` prints $FAKE_JAVA_BANNER to stderr
# as java does; `-jar ... spice-1.0.jar IN -cache DIR -out OUT -subset -silent` records its command line and
# folder, checks the jar is where it was run, and writes OUT as SPICE 1.0 does (one row per image_id, "scores"
# per category with pr/re/f/tp/fp/fn), scoring a caption by word-set overlap with its references.
FAKE_SPICE_JAVA = """#!{python}
import json, os, sys
args = sys.argv[1:]
if args == ["-version"]:
    print(os.environ.get("FAKE_JAVA_BANNER", 'openjdk version "11.0.21" 2023-10-17'), file=sys.stderr)
    sys.exit(0)
with open(os.environ["FAKE_JAVA_LOG"], "a") as fh:
    fh.write(json.dumps({{"argv": args, "cwd": os.getcwd()}}) + "\\n")
if os.environ.get("FAKE_JAVA_FAIL"):
    print("Exception in thread main: java.lang.OutOfMemoryError", file=sys.stderr)
    sys.exit(1)
jar = args[args.index("-jar") + 2]
if not os.path.isfile(jar):
    sys.exit("Error: Unable to access jarfile " + jar)
rows = json.load(open(args[args.index("-jar") + 3]))
results = []
for row in rows:
    test, refs = set(row["test"].split()), {{w for r in row["refs"] for w in r.split()}}
    tp = len(test & refs)
    pr, re = tp / len(test), tp / len(refs)
    f = 2 * pr * re / (pr + re) if tp else 0.0
    all_ = {{"pr": pr, "re": re, "f": f, "tp": tp, "fp": len(test) - tp, "fn": len(refs) - tp, "numImages": 1}}
    none = {{"pr": "NaN", "re": "NaN", "f": "NaN", "tp": 0, "fp": 0, "fn": 0, "numImages": 1}}
    results.append({{"image_id": row["image_id"], "test": row["test"], "refs": row["refs"],
                    "scores": {{"All": all_, "Object": all_, "Attribute": none, "Relation": none}}}})
json.dump(results, open(args[args.index("-out") + 1], "w"))
"""


def _word_f1(test: str, refs: list[str]) -> float:
    words, ref_words = set(test.split()), {w for r in refs for w in r.split()}
    tp = len(words & ref_words)
    return 2 * tp / (len(words) + len(ref_words))  # the harmonic mean of tp/|test| and tp/|refs|


@pytest.fixture()
def fake_spice(tmp_path, monkeypatch):
    """A SPICE folder (spice-1.0.jar and the CoreNLP jars, empty files) and the fake java, selected through
    CLIPCAP_SPICE_DIR / CLIPCAP_SPICE_JAVA; yields (folder, log of the java runs)."""
    import sys

    folder = tmp_path / "spice"
    (folder / "lib").mkdir(parents=True)
    for jar in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"):
        (folder / jar).write_bytes(b"")
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text(FAKE_SPICE_JAVA.format(python=sys.executable))
    java.chmod(0o755)
    log = tmp_path / "java_runs.jsonl"
    monkeypatch.setenv("CLIPCAP_SPICE_DIR", str(folder))
    monkeypatch.setenv("CLIPCAP_SPICE_JAVA", str(java))
    monkeypatch.setenv("FAKE_JAVA_LOG", str(log))
    return folder, log


def test_spice_scorer_runs_through_the_configured_java_and_folder(fake_spice, monkeypatch):
    """compute_caption_metrics runs SPICE: the jar in CLIPCAP_SPICE_DIR with CLIPCAP_SPICE_JAVA, the
    arguments SPICE 1.0 takes, and its output file read back into the mean and per-image "All" F-scores."""
    folder, log = fake_spice
    preds = {"b": "a blue square", "a": "a red circle", 7: "two green circles"}
    refs = {"b": ["a green triangle"], "a": ["a red circle", "one red circle"], 7: ["two green circles"]}
    assert cm.spice_unavailable_reason() is None
    out = cm.compute_caption_metrics(preds, refs, meteor=False, spice=True, per_image=True)
    expected = {key: _word_f1(preds[key], refs[key]) for key in refs}  # lower case, no punctuation: untouched
    assert out["SPICE"] == pytest.approx(sum(expected.values()) / 3)
    assert {key: out["per_image"][key]["SPICE"] for key in refs} == pytest.approx(expected)
    assert 0 < out["SPICE"] < 1 and "SPICE" not in out["skipped"]
    (run,) = [json.loads(line) for line in log.read_text().splitlines()]
    argv = run["argv"]
    assert argv[:3] == ["-jar", "-Xmx8G", "spice-1.0.jar"] and run["cwd"] == str(folder)
    assert argv[-2:] == ["-subset", "-silent"] and argv[argv.index("-cache") + 1] == str(folder / "cache")
    assert not Path(argv[3]).exists()  # the input file was temporary, and not in the SPICE folder
    assert sorted(p.name for p in folder.iterdir()) == ["cache", "lib", "spice-1.0.jar"]

    monkeypatch.setenv("FAKE_JAVA_FAIL", "1")
    failed = cm.compute_caption_metrics(
        preds, refs, meteor=False, spice=None
    )  # auto: skipped, with java's words
    assert "SPICE" not in failed and failed["skipped"]["SPICE"].startswith("SPICE (java) failed")
    with pytest.raises(RuntimeError, match="OutOfMemoryError"):  # spice=True: the failure is an error
        cm.compute_caption_metrics(preds, refs, meteor=False, spice=True)


def test_spice_unavailable_is_reported_as_skipped_never_zero(fake_spice, monkeypatch):
    """Each obstacle is named (a java too new, an unreadable banner, no java, a missing jar), SPICE is then
    skipped with that reason, an error when requested, and never scored 0. Real banners of the fake java."""
    folder, log = fake_spice
    monkeypatch.setenv("FAKE_JAVA_BANNER", 'openjdk version "17.0.15" 2025-04-15')
    reason = cm.spice_unavailable_reason()
    assert "Java <= 11" in reason and "version 17" in reason and "CLIPCAP_SPICE_JAVA" in reason
    out = cm.compute_caption_metrics({1: "a dog"}, {1: ["a dog", "a puppy"]}, meteor=False, spice=None)
    assert "SPICE" not in out and out["skipped"]["SPICE"].startswith("SPICE needs Java <= 11")
    with pytest.raises(RuntimeError, match="SPICE was requested but cannot run: SPICE needs Java <= 11"):
        cm.compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, spice=True, meteor=False)
    off = cm.compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, spice=False, meteor=False)
    assert "SPICE" not in off and off["skipped"]["SPICE"] == cm.SPICE_NOT_REQUESTED
    assert not log.exists()  # the scorer never ran

    monkeypatch.setenv("FAKE_JAVA_BANNER", "Error: could not create the Java Virtual Machine.")
    assert "could not read the version" in cm.spice_unavailable_reason()
    monkeypatch.setenv("FAKE_JAVA_BANNER", 'openjdk version "1.8.0_292"')
    (folder / "lib" / "stanford-corenlp-3.6.0-models.jar").unlink()
    reason = cm.spice_unavailable_reason()
    assert "lib/stanford-corenlp-3.6.0-models.jar" in reason and "CLIPCAP_SPICE_DIR" in reason
    monkeypatch.delenv("CLIPCAP_SPICE_JAVA")
    monkeypatch.setenv("PATH", str(folder))  # no java anywhere
    assert "java is not installed" in cm.spice_unavailable_reason()


@pytest.mark.parametrize(
    "banner, major",
    [
        ('openjdk version "1.8.0_402"\nOpenJDK Runtime Environment (Temurin)(build 1.8.0_402-b06)', 8),
        ('java version "1.7.0_80"\nJava(TM) SE Runtime Environment (build 1.7.0_80-b15)', 7),
        ('openjdk version "21.0.2" 2024-01-16\nOpenJDK Runtime Environment (build 21.0.2+13-58)', 21),
        ('openjdk version "17-ea" 2021-09-14', 17),
        ('Picked up JAVA_TOOL_OPTIONS: -Xss4m\nopenjdk version "11.0.21" 2023-10-17 LTS', 11),
        ("java: command not found", 0),
    ],
)
def test_parse_java_version(banner, major):
    assert cm.parse_java_version(banner) == major


@needs_java
def test_spice_on_this_machine_is_computed_or_skipped_with_reason():
    """With this machine's own java and pycocoevalcap folder: SPICE scored, or skipped naming the obstacle the
    test finds itself (the java version it reads from `java -version`, else the missing CoreNLP jars)."""
    import re
    import subprocess

    out = cm.compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, meteor=False, spice=None)
    banner = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    version = re.search(r'version "(?:1\.)?(\d+)', banner)
    assert version is not None, banner
    if "SPICE" in out:
        assert int(version.group(1)) <= 11 and 0 <= out["SPICE"] <= 1
    elif int(version.group(1)) > 11:
        assert f"version {version.group(1)}" in out["skipped"]["SPICE"]
    else:
        assert "stanford-corenlp-3.6.0" in out["skipped"]["SPICE"]


def test_without_java_falls_back_to_simple_tokenizer(monkeypatch):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    monkeypatch.setattr(cm.shutil, "which", lambda name, *a, **k: None)
    out = cm.compute_caption_metrics(PREDICTIONS, REFERENCES, spice=None)
    assert out["tokenizer"] == "simple"
    assert "METEOR" not in out and "java" in out["skipped"]["METEOR"]
    assert "SPICE" not in out and "java" in out["skipped"]["SPICE"]
    assert "PTB tokenizer" in out["skipped"]
    gts = {k: [cm.simple_tokenize(r) for r in refs] for k, refs in REFERENCES.items()}
    res = {k: [cm.simple_tokenize(PREDICTIONS[k])] for k in REFERENCES}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert out["Bleu_4"] == pytest.approx(bleu[3], abs=1e-12)
    assert out["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert out["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


def test_simple_tokenize_known_answers():
    assert cm.simple_tokenize("A Man, riding a HORSE!") == "a man riding a horse"
    assert cm.simple_tokenize("  Two  dogs... (playing)  ") == "two dogs playing"
    assert cm.simple_tokenize("") == ""


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same image ids"):
        cm.compute_caption_metrics({1: "a", 2: "b"}, {1: ["a"]})
    with pytest.raises(TypeError, match="image 1"):
        cm.compute_caption_metrics({1: ["a"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cm.compute_caption_metrics({1: "a"}, {1: []})
    with pytest.raises(ValueError, match="empty"):
        cm.compute_caption_metrics({}, {})


# --------------------------------------------------------------------------- CLIPScore on embeddings


def test_clip_score_known_answers_on_hand_made_embeddings():
    image = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    theta = 0.7
    caption = torch.tensor(
        [[1.0, 0.0, 0.0], [math.cos(theta), math.sin(theta), 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, -1.0]]
    )
    got = cs.clip_score_from_embeddings(image, caption)
    expected = torch.tensor(
        [2.5, 2.5 * math.cos(theta), 2.5, 0.0]
    )  # identical -> 2.5*cos = 2.5; negative -> 0
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(cs.clip_score_from_embeddings(image, caption, w=1.0), expected / 2.5)
    # identical random embeddings: 2.5 * cos(x, x) = 2.5
    x = torch.randn(6, 16)
    torch.testing.assert_close(cs.clip_score_from_embeddings(x, x.clone()), torch.full((6,), 2.5))


def test_ref_clip_score_is_harmonic_mean_with_clipped_max_reference_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    caption = torch.tensor([[0.6, 0.8], [0.6, 0.8], [-1.0, 0.0]])
    refs = [
        torch.tensor([[0.0, 1.0], [1.0, 0.0]]),  # cos 0.8 and 0.6 -> max 0.8
        torch.tensor([[-0.6, -0.8]]),  # cos -1 -> clipped to 0
        torch.tensor([[1.0, 0.0]]),  # caption opposite to image and ref: both terms 0
    ]
    clip_s = 2.5 * 0.6
    expected = torch.tensor([2 * clip_s * 0.8 / (clip_s + 0.8), 0.0, 0.0])
    torch.testing.assert_close(cs.max_reference_similarity(caption, refs), torch.tensor([0.8, 0.0, 0.0]))
    torch.testing.assert_close(cs.ref_clip_score_from_embeddings(image, caption, refs), expected)
    with pytest.raises(ValueError, match="one reference tensor per caption"):
        cs.ref_clip_score_from_embeddings(image, caption, refs[:2])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cs.clip_score_from_embeddings(image, caption[:2])


# --------------------------------------------------------------------------- CLIPScore with a tiny CLIPModel


def _tiny_clip(tmp_dir: Path | None = None):
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=96,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=tiny_vision_config(projection_dim=16).to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if tmp_dir is not None:
        model.save_pretrained(tmp_dir)
        processor.save_pretrained(tmp_dir)
    return model, processor


def _images(n: int):
    from PIL import Image

    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        size = (32 + 8 * (i % 3), 32 + 4 * (i % 2))
        arr = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        out.append(Image.fromarray(arr, "RGB"))
    return out


CLIP_CAPTIONS = [
    "a red circle",
    "two dogs playing in the park",
    "a cat",
    "people walking down a street",
    "food",
]
CLIP_REFS = [
    ["a red round shape", "red circle"],
    ["dogs in a park"],
    ["a cat on a table", "a kitten", "cat"],
    ["a street"],
    ["a plate of food"],
]


@torch.no_grad()
def _unbatched_clip_scores(model, processor, images, captions, references):
    """One image / one text per forward pass, written independently of the library."""

    def text_embed(text):
        enc = processor.tokenizer(["A photo depicts " + text], return_tensors="pt")
        out = model.get_text_features(**enc)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out[0] / out[0].norm()

    clip_s, ref_s = [], []
    for image, caption, refs in zip(images, captions, references):
        pix = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pix)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        img = img[0] / img[0].norm()
        cap = text_embed(caption)
        c = 2.5 * max(float(img @ cap), 0.0)
        r = max(max(float(text_embed(ref) @ cap) for ref in refs), 0.0)
        clip_s.append(c)
        ref_s.append(2 * c * r / (c + r) if c + r > 0 else 0.0)
    return clip_s, ref_s


def test_clip_score_batched_matches_unbatched_with_tiny_clip():
    model, processor = _tiny_clip()
    images = _images(len(CLIP_CAPTIONS))
    out = cs.compute_clip_score(
        model, processor, images, CLIP_CAPTIONS, CLIP_REFS, batch_size=2, per_image=True
    )
    clip_s, ref_s = _unbatched_clip_scores(model, processor, images, CLIP_CAPTIONS, CLIP_REFS)
    assert out["num_images"] == 5
    assert out["CLIP-S_per_image"] == pytest.approx(clip_s, abs=1e-5)
    assert out["RefCLIP-S_per_image"] == pytest.approx(ref_s, abs=1e-5)
    assert out["CLIP-S"] == pytest.approx(sum(clip_s) / 5, abs=1e-5)
    assert out["RefCLIP-S"] == pytest.approx(sum(ref_s) / 5, abs=1e-5)
    # the scores depend on the caption: a random tower gives different scores to different captions
    assert len({round(s, 6) for s in out["CLIP-S_per_image"]}) > 1 or len({round(s, 6) for s in ref_s}) > 1
    without_refs = cs.compute_clip_score(model, processor, images, CLIP_CAPTIONS, batch_size=3)
    assert "RefCLIP-S" not in without_refs and without_refs["CLIP-S"] == pytest.approx(
        out["CLIP-S"], abs=1e-6
    )
    with pytest.raises(ValueError, match="one caption per image"):
        cs.compute_clip_score(model, processor, images[:2], CLIP_CAPTIONS)


def test_clip_score_from_local_path_and_image_files(tmp_path):
    model, processor = _tiny_clip(tmp_path / "clip")
    images = _images(3)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    loaded_model, loaded_processor = cs.load_clip(tmp_path / "clip")
    from_files = cs.compute_clip_score(
        loaded_model, loaded_processor, paths, CLIP_CAPTIONS[:3], CLIP_REFS[:3]
    )
    in_memory = cs.compute_clip_score(model, processor, images, CLIP_CAPTIONS[:3], CLIP_REFS[:3])
    assert from_files["CLIP-S"] == pytest.approx(in_memory["CLIP-S"], abs=1e-6)
    assert from_files["RefCLIP-S"] == pytest.approx(in_memory["RefCLIP-S"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cs.load_clip(tmp_path / "missing")


# --------------------------------------------------------------------------- evaluate modules, offline


def test_evaluate_load_coco_caption_offline_gives_library_numbers(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(REPO_ROOT / "metrics" / "coco_caption"))
    ids = list(PREDICTIONS)
    got = metric.compute(
        predictions=[PREDICTIONS[k] for k in ids],
        references=[REFERENCES[k] for k in ids],
        image_ids=ids,
        meteor=False,
    )
    expected = cm.compute_caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    assert got == expected
    single = metric.compute(
        predictions=["a man riding a horse"], references=["A man riding a horse."], meteor=False
    )
    assert single["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_evaluate_load_clipscore_offline_gives_library_numbers(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = _tiny_clip(tmp_path / "clip")
    images = _images(4)
    metric = evaluate.load(str(REPO_ROOT / "metrics" / "clipscore"), clip_model=str(tmp_path / "clip"))
    got = metric.compute(predictions=CLIP_CAPTIONS[:4], references=CLIP_REFS[:4], images=images, batch_size=3)
    expected = cs.compute_clip_score(model, processor, images, CLIP_CAPTIONS[:4], CLIP_REFS[:4])
    assert got.keys() == expected.keys()
    for key in ("CLIP-S", "RefCLIP-S"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6)
    no_refs = metric.compute(predictions=CLIP_CAPTIONS[:4], references=[[]] * 4, images=images)
    assert "RefCLIP-S" not in no_refs and no_refs["CLIP-S"] == pytest.approx(expected["CLIP-S"], abs=1e-6)


# --------------------------------------------------------------------------- clipcap evaluate


def _write_karpathy_dataset(root: Path, extra_refs: dict[int, str] | None = None) -> Path:
    """Six tiny PNGs in root/val2014 and a Karpathy-style JSON (4 test images, 2 train).

    ``extra_refs`` adds a reference to image i (e.g. the model's own caption, for non-zero scores).
    """
    from PIL import Image

    (root / "val2014").mkdir(parents=True, exist_ok=True)
    captions = [
        ["A red circle.", "a red round shape", "Red circle on white!", "a circle", "a red disc"],
        ["two dogs playing in the park", "Dogs play.", "Two dogs, in a park."],
        ["a cat sitting on a wooden table", "A cat on a table."],
        ["people walking down a city street", "A busy street."],
        ["a train image", "train"],
        ["another train image"],
    ]
    for i, extra in (extra_refs or {}).items():
        captions[i] = [extra, *captions[i]]
    images = []
    for i, caps in enumerate(captions):
        name = f"COCO_val2014_{i:012d}.png"
        Image.new("RGB", (20 + 5 * i, 24), (40 * i % 256, 200 - 30 * i, 90)).save(root / "val2014" / name)
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "cocoid": 1000 + i,
                "split": "test" if i < 4 else "train",
                "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps],
            }
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


@pytest.fixture()
def saved_tiny_model(tmp_path, tiny_model, tiny_processor):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    return model_dir


@needs_java
@pytest.mark.slow
def test_clipcap_evaluate_command_writes_consistent_outputs_equal_to_pycocoevalcap(
    tmp_path, saved_tiny_model
):
    from transformers import AutoModel, AutoProcessor

    from modeling_clipcap.cli import main
    from modeling_clipcap.data import load_caption_dataset

    # what the model says for images 0 and 2 becomes one of their references, so scores are not all 0
    data = _write_karpathy_dataset(tmp_path / "coco")
    model = AutoModel.from_pretrained(saved_tiny_model, local_files_only=True)
    processor = AutoProcessor.from_pretrained(saved_tiny_model, local_files_only=True)
    rows = list(load_caption_dataset(data, split="test")[0])
    said, _ = ev.generate_captions(
        model, processor, rows, batch_size=3, num_beams=2, max_new_tokens=8, progress=False
    )
    data = _write_karpathy_dataset(
        tmp_path / "coco", {0: said[0]["caption"] + ".", 2: said[2]["caption"].upper()}
    )
    (saved_tiny_model / "README.md").write_text("# tiny model\n\nSome text.\n")
    out_dir = tmp_path / "eval"
    argv = ["evaluate", "--model", str(saved_tiny_model), "--data", str(data), "--split", "test"]
    argv += ["--output_dir", str(out_dir), "--batch_size", "3", "--num_beams", "2", "--max_new_tokens", "8"]
    assert main(argv + ["--update_model_card", "--no_progress"]) == 0

    predictions = json.loads((out_dir / "predictions.json").read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    table = (out_dir / "metrics.md").read_text()
    # COCO results format: one entry per unique test image, integer COCO ids, string captions
    assert sorted(p["image_id"] for p in predictions) == [1000, 1001, 1002, 1003]
    assert all(set(p) == {"image_id", "caption"} and isinstance(p["caption"], str) for p in predictions)
    assert [p["caption"] for p in predictions] == [p["caption"] for p in said]
    assert metrics["num_images"] == 4 and metrics["num_references"] == 14
    assert metrics["config"]["num_beams"] == 2 and metrics["data_report"]["num_images"] == 4

    # metrics.json == pycocoevalcap's own numbers on predictions.json and the data's references
    refs = json.loads(data.read_text())["images"][:4]
    references = {img["cocoid"]: [s["raw"] for s in img["sentences"]] for img in refs}
    direct, _ = _direct_pycocoevalcap({p["image_id"]: p["caption"] for p in predictions}, references)
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert abs(metrics[key] - float(direct[key])) <= 1e-9, key
    assert metrics["Bleu_1"] > 0 and metrics["ROUGE_L"] > 0 and metrics["METEOR"] > 0
    assert "SPICE" in metrics or "SPICE" in metrics["skipped"]

    # the table shows the same numbers x100
    assert table == ev.render_metrics_table(metrics, title=table.splitlines()[0])
    header, _, row = [line for line in table.splitlines() if line.startswith("|")]
    cells = dict(
        zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")])
    )
    assert (
        cells["BLEU-4"] == f"{100 * metrics['Bleu_4']:.2f}"
        and cells["CIDEr"] == f"{100 * metrics['CIDEr']:.2f}"
    )
    assert cells["SPICE"] == ("–" if "SPICE" not in metrics else f"{100 * metrics['SPICE']:.2f}")
    # the model card got the table, between markers, after the existing text; a second run replaces it
    from huggingface_hub import ModelCard

    card = (saved_tiny_model / "README.md").read_text()
    body = ModelCard(card).text
    assert body.startswith("# tiny model") and hub.MODEL_CARD_START in body and row in body
    # ... and model-index metadata with the same numbers (x100, 2 decimals) for this dataset and split
    results = ModelCard(card).data.eval_results
    by_metric = {r.metric_type: r for r in results}
    assert by_metric["cider"].metric_value == round(100 * metrics["CIDEr"], 2)
    assert by_metric["bleu_4"].metric_value == round(100 * metrics["Bleu_4"], 2)
    assert {(r.task_type, r.dataset_name, r.dataset_split) for r in results} == {
        ("image-to-text", data.name, "test")
    }
    assert "meteor" in by_metric
    assert main(argv + ["--update_model_card", "--no_progress", "--no_meteor"]) == 0
    card2 = (saved_tiny_model / "README.md").read_text()
    assert card2.count(hub.MODEL_CARD_START) == 1 and "METEOR skipped" in card2
    results2 = ModelCard(card2).data.eval_results
    assert len(results2) == len(results) - 1 and "meteor" not in {r.metric_type for r in results2}


def test_evaluate_model_batched_equals_one_by_one_and_uses_image_embeds(tmp_path, tiny_model, tiny_processor):
    from modeling_clipcap.data import load_caption_dataset

    data = _write_karpathy_dataset(tmp_path / "coco")
    dataset, _ = load_caption_dataset(data, split="test")
    kwargs = dict(num_beams=2, max_new_tokens=6, meteor=False, spice=False, progress=False)
    preds_batched, metrics = ev.evaluate_model(tiny_model, tiny_processor, dataset, batch_size=3, **kwargs)
    preds_single, metrics_single = ev.evaluate_model(
        tiny_model, tiny_processor, list(dataset), batch_size=1, **kwargs
    )
    assert preds_batched == preds_single and metrics == metrics_single
    # duplicate records of one image are merged into one prediction with pooled references
    rows = list(dataset)
    dup = dict(rows[0], captions=["an extra reference"])
    preds_dup, metrics_dup = ev.evaluate_model(
        tiny_model, tiny_processor, rows + [dup], batch_size=2, **kwargs
    )
    assert len(preds_dup) == 4 and metrics_dup["num_references"] == metrics["num_references"] + 1
    # precomputed image embeddings give the same captions as pixel values
    from modeling_clipcap.image_io import load_image

    with torch.no_grad():
        pix = tiny_processor(images=[load_image(r["image"]) for r in rows], return_tensors="pt")[
            "pixel_values"
        ]
        embeds = (
            tiny_model.get_image_embeddings(pixel_values=pix).pooler_output
            if hasattr(tiny_model, "get_image_embeddings")
            else None
        )
    if embeds is not None:
        embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
        emb_rows = [
            {"image_id": r["image_id"], "image_embeds": e, "captions": r["captions"]}
            for r, e in zip(rows, embeds)
        ]
        preds_emb, _ = ev.evaluate_model(tiny_model, tiny_processor, emb_rows, batch_size=4, **kwargs)
        assert preds_emb == preds_batched


def test_evaluate_command_reports_bad_input_clearly(tmp_path, saved_tiny_model, capsys):
    from modeling_clipcap.cli import main

    status = main(
        ["evaluate", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "x.json"), "--no_progress"]
    )
    assert status == 2 and "not a local model directory" in capsys.readouterr().err
    status = main(["evaluate", "--model", str(saved_tiny_model), "--data", str(tmp_path / "missing.json")])
    assert status == 2 and "missing.json" in capsys.readouterr().err


def test_render_metrics_table_prints_x100_and_skips():
    metrics = {
        "Bleu_1": 0.71234,
        "Bleu_2": 0.5,
        "Bleu_3": 0.4,
        "Bleu_4": 0.3353,
        "METEOR": 0.27449,
        "ROUGE_L": 0.55,
        "CIDEr": 1.1308,
        "skipped": {"SPICE": "needs Java <= 11"},
        "num_images": 5000,
        "num_references": 25010,
        "tokenizer": "ptb",
    }
    table = ev.render_metrics_table(metrics)
    lines = table.splitlines()
    assert lines[0] == "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr | SPICE |"
    assert lines[2] == "| 71.23 | 50.00 | 40.00 | 33.53 | 27.45 | 55.00 | 113.08 | – |"
    assert "SPICE skipped: needs Java <= 11" in table and "5000 images, 25010 references" in table
    with_clip = ev.render_metrics_table({**metrics, "CLIP-S": 0.7712})
    assert with_clip.splitlines()[0].endswith("| CLIP-S |") and "| 77.12 |" in with_clip


@pytest.mark.parametrize(
    "banner, major",
    [
        ('openjdk version "1.8.0_292"\nOpenJDK Runtime Environment (build 1.8.0_292-b10)', 8),
        ('java version "1.7.0_80"', 7),
        ('openjdk version "11.0.21" 2023-10-17', 11),
        ('openjdk version "17" 2021-09-14', 17),
        ('openjdk version "21.0.2" 2024-01-16 LTS', 21),
        ("no version line at all", 0),
    ],
)
def test_java_version_reads_the_banner_of_the_java_on_path(tmp_path, monkeypatch, banner, major):
    """A fake ``java`` on PATH prints a real banner (to stderr, as java does); java_version runs it."""
    fake = tmp_path / "java"
    lines = "".join(f"printf '%s\\n' '{line}' >&2\n" for line in banner.splitlines())  # shell builtins only
    fake.write_text(f"#!/bin/sh\n{lines}")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cm.java_version() == major
    reason = cm.spice_unavailable_reason()
    if major == 0:
        assert "could not read the version" in reason
    elif major > 11:
        assert reason is not None and f"version {major}" in reason
    else:  # a usable java: whatever is still missing is named, never the java version
        assert reason is None or "version" not in reason


def test_evaluate_bad_image_policy_error_is_fail_and_skip_lists(tmp_path, saved_tiny_model, capsys):
    """--on_bad_image takes the one policy's values: "error" (another name of "fail") stops naming the file that
    cannot be decoded, "skip" scores the others and lists it."""
    from PIL import Image

    from modeling_clipcap.cli import main

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (24, 20), (200, 30, 30)).save(data / "good.png")
    (data / "broken.png").write_bytes(b"not a png, but not empty either")
    rows = [{"file_name": name, "captions": ["a red square."]} for name in ("good.png", "broken.png")]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["evaluate", "--model", str(saved_tiny_model), "--data", str(data), "--split", "train"]
    argv += ["--no_meteor", "--no_progress", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval")]
    capsys.readouterr()
    assert main(argv + ["--on_bad_image", "error"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(argv + ["--on_bad_image", "skip"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_skipped_images"] == 1 and "broken.png" in json.dumps(metrics["skipped_images"])
