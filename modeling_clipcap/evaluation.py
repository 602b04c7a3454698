"""Caption metrics as the field reports them, offline: pycocoevalcap and CLIPScore.

Two families of metrics live here, shared by ``clipcap evaluate``, the
``evaluate`` modules under ``metrics/`` and training's validation:

* :func:`compute_caption_metrics`: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
  computed by ``pycocoevalcap`` after its PTB tokenizer, with pycocoevalcap's
  key names (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``), and
  ``SPICE`` only when asked for (:data:`SPICE_NOT_REQUESTED` says why it is not
  a default). Scores are in [0, 1] (CIDEr in [0, 10]); papers print them x100.
  Metrics that cannot run here are listed under ``"skipped"`` with the reason
  and are never reported as 0.
* CLIPScore (Hessel et al., 2021): ``CLIP-S = w * max(cos(image, caption), 0)``
  with ``w = 2.5`` and the caption prefixed with ``"A photo depicts"``;
  ``RefCLIP-S`` is the harmonic mean of CLIP-S and
  ``max(max_r cos(caption, r), 0)`` over the references ``r``. Pure functions
  on embeddings (:func:`clip_score_from_embeddings`,
  :func:`ref_clip_score_from_embeddings`) and batched functions over a
  transformers ``CLIPModel`` (:func:`compute_clip_score`).

Nothing in this module touches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CAPTION_METRIC_KEYS",
    "CLIPSCORE_PROMPT",
    "CLIPSCORE_W",
    "clip_score_from_embeddings",
    "compute_caption_metrics",
    "compute_clip_score",
    "encode_clip_images",
    "encode_clip_texts",
    "java_version",
    "load_clip",
    "max_reference_similarity",
    "ref_clip_score_from_embeddings",
    "parse_java_version",
    "simple_tokenize",
    "spice_dir",
    "spice_java",
    "spice_unavailable_reason",
    "SPICE_NOT_REQUESTED",
]

# pycocoevalcap's names, in the order papers print them.
CAPTION_METRIC_KEYS: tuple[str, ...] = (
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "SPICE",
)

# ----------------------------------------------------------------------------
# Java and SPICE detection
# ----------------------------------------------------------------------------


def parse_java_version(banner: str) -> int:
    """Major version in the banner of ``java -version``: 8 for "1.8.0_x", 17 for "17.0.x", 21 for "21";
    0 when there is no version in it."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', banner)
    if match is None:
        return 0
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:  # "1.8.0_292" is Java 8
        major = int(match.group(2))
    return major


def java_version(java: str | os.PathLike | None = None) -> int | None:
    """Major version of ``java`` (default: the ``java`` on ``PATH``); None without one, 0 when it runs but its
    version cannot be read."""
    java = java or shutil.which("java")
    if java is None:
        return None
    try:
        proc = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 0
    return parse_java_version(proc.stderr + proc.stdout)


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap

    # pycocoevalcap is a namespace package (no __init__.py): use __path__, not __file__.
    return Path(next(iter(pycocoevalcap.__path__))).resolve()


# SPICE 1.0 parses with Stanford CoreNLP 3.6.0; pycocoevalcap downloads these two jars on first use.
SPICE_JAR = "spice-1.0.jar"
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_SPICE_MAX_JAVA = 11

#: The reason listed under ``"skipped"`` when SPICE was not asked for (the default everywhere: ``clipcap
#: evaluate``, the ``coco_caption`` evaluate module, training's validation, the demo).
SPICE_NOT_REQUESTED = (
    "not requested (SPICE runs only when asked: --spice on|auto, spice=True|None): it needs the Stanford "
    "CoreNLP 3.6.0 jars, which pycocoevalcap downloads from the Stanford NLP site at first use and no package "
    "archive ships, and a Java <= 11"
)


def spice_java() -> str | None:
    """The java that runs SPICE: ``$CLIPCAP_SPICE_JAVA`` (e.g. a Java 11 next to a newer default java), else
    the ``java`` on ``PATH``."""
    return os.environ.get("CLIPCAP_SPICE_JAVA") or shutil.which("java")


def spice_dir() -> Path:
    """The folder holding ``spice-1.0.jar`` and its ``lib/``: ``$CLIPCAP_SPICE_DIR``, else pycocoevalcap's
    ``spice/`` folder (ImportError without pycocoevalcap)."""
    env = os.environ.get("CLIPCAP_SPICE_DIR")
    return Path(env) if env else _pycocoevalcap_dir() / "spice"


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run on this machine, or None when it can.

    SPICE needs a java <= 11 (:func:`spice_java`; its Kryo-based cache fails on Java 16+) and, in
    :func:`spice_dir`, ``spice-1.0.jar`` with the Stanford CoreNLP 3.6.0 jars in ``lib/``, which pycocoevalcap
    downloads on first use. This module never downloads them.
    """
    try:
        folder = spice_dir()
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'modeling_clipcap[eval]')"
    java = spice_java()
    version = java_version(java)
    if version is None:
        return "java is not installed (SPICE needs Java <= 11 on PATH, or CLIPCAP_SPICE_JAVA)"
    if version == 0:
        return f"could not read the version of {java} (SPICE needs Java <= 11)"
    if version > _SPICE_MAX_JAVA:
        return (
            f"SPICE needs Java <= {_SPICE_MAX_JAVA}, but {java} is version {version} "
            "(set CLIPCAP_SPICE_JAVA to a Java 8-11 executable)"
        )
    missing = [
        jar for jar in (SPICE_JAR, *(f"lib/{j}" for j in _SPICE_CORENLP_JARS)) if not (folder / jar).is_file()
    ]
    if missing:
        return (
            f"SPICE jars missing from {folder} ({', '.join(missing)}); nothing here downloads them: run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once on a machine with network, or set "
            "CLIPCAP_SPICE_DIR to a folder that has them"
        )
    return None


# ----------------------------------------------------------------------------
# Quiet execution of pycocoevalcap (it prints, and its java children write to fd 2)
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_fds() -> Iterator[Path]:
    """Send file descriptors 1 and 2 (Python and child processes) to a temporary log file.

    Yields the log's path so a failure can show what was printed. Not thread-safe:
    descriptors are process-wide.
    """
    import sys

    with tempfile.TemporaryDirectory(prefix="clipcap-eval-") as tmp:
        log_path = Path(tmp) / "pycocoevalcap.log"
        with open(log_path, "w+b") as log:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            saved = {fd: os.dup(fd) for fd in (1, 2)}
            try:
                for fd in (1, 2):
                    os.dup2(log.fileno(), fd)
                yield log_path
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                for fd, saved_fd in saved.items():
                    os.dup2(saved_fd, fd)
                    os.close(saved_fd)


def _log_tail(log_path: Path, limit: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return log_path.read_text(errors="replace")[-limit:].strip()
    return ""


# ----------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------

# Tokens made only of these characters are dropped by the fallback tokenizer, as
# pycocoevalcap drops its PUNCTUATIONS list after PTB tokenization.
_PUNCTUATION_CHARS = set(".?!,:;-'`\"()[]{}")
_SIMPLE_TOKEN = re.compile(r"\w+|[^\w\s]+")


def simple_tokenize(text: str) -> str:
    """Fallback tokenizer used only when ``java`` is missing (no PTB tokenizer).

    Lowercases, splits words from punctuation (``\\w+`` runs and runs of other
    non-space characters) and drops tokens made only of ``. ? ! , : ; - ' ` "``
    and brackets, then joins with single spaces. It approximates the PTB
    tokenizer + punctuation removal of pycocoevalcap but differs on clitics
    ("dog's" stays "dog" "s" here, PTB gives "dog 's") and a few symbols, so
    numbers computed with it are close to, not equal to, the published protocol.

    >>> simple_tokenize("A Man, riding a HORSE!")
    'a man riding a horse'
    """
    tokens = _SIMPLE_TOKEN.findall(text.lower())
    return " ".join(tok for tok in tokens if not set(tok) <= _PUNCTUATION_CHARS)


def exact_match_text(text: str) -> str:
    """What exact match compares: lower case, every "." removed, white space collapsed."""
    return " ".join(text.lower().replace(".", " ").split())


def exact_match_rate(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> float:
    """Share of images whose caption equals one of its references (by :func:`exact_match_text`); 0 for none."""
    hits = sum(
        exact_match_text(caption) in {exact_match_text(r) for r in references[key]}
        for key, caption in predictions.items()
    )
    return hits / max(len(predictions), 1)


def _clean_line(caption: str) -> str:
    # One caption must stay one line for the PTB tokenizer: Java also breaks lines on
    # \r, \u2028, \u0085 ..., which would silently shift every later caption by one.
    return " ".join(caption.split())


def _tokenize(captions: Mapping[Hashable, list[str]], use_ptb: bool) -> dict[Hashable, list[str]]:
    """{id: [caption, ...]} -> {id: [tokenized caption, ...]} with pycocoevalcap's PTB tokenizer or the fallback."""
    if not use_ptb:
        return {key: [simple_tokenize(c) for c in caps] for key, caps in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb_input = {key: [{"caption": _clean_line(c)} for c in caps] for key, caps in captions.items()}
    with _quiet_fds() as log_path:
        try:
            tokenized = PTBTokenizer().tokenize(ptb_input)
        except Exception as err:
            raise RuntimeError(
                f"pycocoevalcap's PTB tokenizer (java) failed: {err}\n{_log_tail(log_path)}"
            ) from err
    for key, caps in captions.items():
        if len(tokenized.get(key, [])) != len(caps):
            raise RuntimeError(
                f"the PTB tokenizer returned {len(tokenized.get(key, []))} captions for image {key!r} instead of "
                f"{len(caps)}; the java tokenizer output is misaligned (see pycocoevalcap's tokenizer)"
            )
    return tokenized


# ----------------------------------------------------------------------------
# pycocoevalcap metrics
# ----------------------------------------------------------------------------


def _check_inputs(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError(
            "compute_caption_metrics expects predictions as {image_id: caption} and references as "
            f"{{image_id: [caption, ...]}}, got {type(predictions).__name__} and {type(references).__name__}"
        )
    if not predictions:
        raise ValueError("no predictions to score: predictions is empty")
    missing_refs = [key for key in predictions if key not in references]
    missing_preds = [key for key in references if key not in predictions]
    if missing_refs or missing_preds:
        raise ValueError(
            "predictions and references must cover the same image ids: "
            f"{len(missing_refs)} predicted id(s) without references (e.g. {missing_refs[:3]}), "
            f"{len(missing_preds)} referenced id(s) without a prediction (e.g. {missing_preds[:3]})"
        )
    res: dict[Hashable, list[str]] = {}
    gts: dict[Hashable, list[str]] = {}
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(
                f"prediction for image {key!r} must be one caption string, got {type(caption).__name__}"
            )
        refs = references[key]
        if isinstance(refs, str):
            refs = [refs]
        refs = list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"image {key!r} needs a non-empty list of reference strings, got {refs!r}")
        res[key] = [caption]
        gts[key] = refs
    return res, gts


def _close_meteor(meteor: Any) -> None:
    """Stop METEOR's java process now (pycocoevalcap only does it in ``__del__``)."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    with contextlib.suppress(Exception):
        proc.stdin.close()
    with contextlib.suppress(Exception):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(Exception):
            stream.close()


def _meteor_score(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = None
    with _quiet_fds() as log_path:
        try:
            meteor = Meteor()
            score, scores = meteor.compute_score(gts, res)
        except Exception as err:
            raise RuntimeError(f"METEOR (java) failed: {err!r}\n{_log_tail(log_path)}") from err
        finally:
            if meteor is not None:
                _close_meteor(meteor)
    return float(score), [float(s) for s in scores]


def _spice_score(gts: dict, res: dict) -> tuple[float, list[float]]:
    """SPICE of tokenized captions: (mean, per image in ``gts`` order, as the other scorers), each the "All"
    F-score (pycocoevalcap's ``Spice`` sorts the ids instead, which mis-assigned per-image scores here).

    Runs ``spice-1.0.jar`` with the arguments pycocoevalcap's ``Spice.compute_score`` passes, but with
    :func:`spice_java` and :func:`spice_dir`, and with its input and output files in a temporary folder
    instead of the installed package. Its parse cache stays in ``<spice_dir>/cache``, as pycocoevalcap keeps it.
    """
    import numpy as np

    ids = list(gts)
    folder, java = spice_dir(), spice_java()
    with tempfile.TemporaryDirectory(prefix="clipcap-spice-") as tmp:
        in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
        rows = [{"image_id": i, "test": res[key][0], "refs": list(gts[key])} for i, key in enumerate(ids)]
        in_file.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        (folder / "cache").mkdir(exist_ok=True)
        command = [str(java), "-jar", "-Xmx8G", SPICE_JAR, str(in_file), "-cache", str(folder / "cache")]
        command += ["-out", str(out_file), "-subset", "-silent"]
        proc = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        if proc.returncode != 0 or not out_file.is_file():
            raise RuntimeError(
                f"SPICE (java) failed with exit status {proc.returncode}: {(proc.stderr + proc.stdout)[-2000:]}"
            )
        results = json.loads(out_file.read_text(encoding="utf-8"))
    by_row = {item["image_id"]: item["scores"]["All"]["f"] for item in results}
    missing = [ids[i] for i in range(len(ids)) if i not in by_row]
    if missing:
        raise RuntimeError(f"SPICE (java) returned no score for images {missing[:5]}")
    # no tuples to score gives NaN (or null): nan, as pycocoevalcap's float_convert does
    per_image = [float("nan") if by_row[i] is None else float(by_row[i]) for i in range(len(ids))]
    return float(np.mean(per_image)), per_image


def compute_caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool | None = False,
    *,
    meteor: bool = True,
    per_image: bool = False,
) -> dict[str, Any]:
    """Score captions with pycocoevalcap after its PTB tokenizer, as COCO papers do.

    Args:
        predictions: ``{image_id: caption}``, one generated caption per image.
        references: ``{image_id: [reference, ...]}``, any number (>= 1) of
            references per image (COCO Karpathy test: 5). Ids must match
            ``predictions`` exactly; raw (untokenized) text: the PTB tokenizer
            lowercases and removes punctuation.
        spice: ``False`` (default) skips SPICE, listed under ``"skipped"`` with
            :data:`SPICE_NOT_REQUESTED`; ``True`` requires it (raises when it
            cannot run); ``None`` computes it when it can run here and otherwise
            lists it under ``"skipped"`` with what is missing.
        meteor: ``False`` skips METEOR (its java start-up costs about 10 s;
            useful for frequent validation). Listed under ``"skipped"`` then.
        per_image: also return ``"per_image": {image_id: {metric: score}}``.

    Returns:
        A dict with the corpus scores under pycocoevalcap's keys (``Bleu_1`` ..
        ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``; floats, 0-1,
        CIDEr 0-10), plus ``"skipped"`` (``{metric: reason}`` for every metric
        not computed, which is then absent, never 0), ``"tokenizer"`` (``"ptb"``,
        or ``"simple"`` when java is missing and :func:`simple_tokenize` was used),
        ``"num_images"`` and ``"num_references"``.

    Without ``java`` the PTB tokenizer, METEOR and SPICE cannot run: BLEU,
    ROUGE-L and CIDEr are still computed on :func:`simple_tokenize` output and
    the result says so in ``"tokenizer"`` and ``"skipped"``.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise ImportError(
            "caption metrics need pycocoevalcap: pip install 'modeling_clipcap[eval]' (or pip install pycocoevalcap)"
        ) from err

    res_raw, gts_raw = _check_inputs(predictions, references)
    has_java = shutil.which("java") is not None
    skipped: dict[str, str] = {}

    gts = _tokenize(gts_raw, use_ptb=has_java)
    res = _tokenize(res_raw, use_ptb=has_java)

    results: dict[str, Any] = {}
    per: dict[str, list[float]] = {}
    with _quiet_fds():
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        results[f"Bleu_{n + 1}"] = float(bleu[n])
        per[f"Bleu_{n + 1}"] = [float(s) for s in bleu_per[n]]

    if not meteor:
        skipped["METEOR"] = "disabled (meteor=False)"
    elif has_java:
        results["METEOR"], per["METEOR"] = _meteor_score(gts, res)
    else:
        skipped["METEOR"] = "java is not installed: METEOR runs pycocoevalcap's meteor-1.5.jar"

    rouge, rouge_per = Rouge().compute_score(gts, res)
    results["ROUGE_L"], per["ROUGE_L"] = float(rouge), [float(s) for s in rouge_per]
    cider, cider_per = Cider().compute_score(gts, res)
    results["CIDEr"], per["CIDEr"] = float(cider), [float(s) for s in cider_per]

    if spice is False:
        skipped["SPICE"] = SPICE_NOT_REQUESTED
    else:
        reason = spice_unavailable_reason()
        if reason is not None:
            if spice:
                raise RuntimeError(f"SPICE was requested but cannot run: {reason}")
            skipped["SPICE"] = reason
        else:
            try:
                results["SPICE"], per["SPICE"] = _spice_score(gts, res)
            except RuntimeError as err:
                if spice:
                    raise
                skipped["SPICE"] = str(err).splitlines()[0]

    if not has_java:
        skipped.setdefault(
            "PTB tokenizer",
            "java is not installed: BLEU/ROUGE-L/CIDEr use the simple fallback tokenizer "
            "(lowercase, punctuation removed); close to but not exactly the published protocol",
        )

    out: dict[str, Any] = {key: results[key] for key in CAPTION_METRIC_KEYS if key in results}
    out["skipped"] = skipped
    out["tokenizer"] = "ptb" if has_java else "simple"
    out["num_images"] = len(res)
    out["num_references"] = sum(len(refs) for refs in gts.values())
    if per_image:
        ids = list(res)
        out["per_image"] = {
            key: {metric: per[metric][i] for metric in CAPTION_METRIC_KEYS if metric in per}
            for i, key in enumerate(ids)
        }
    return out


# ----------------------------------------------------------------------------
# CLIPScore (Hessel et al., 2021)
# ----------------------------------------------------------------------------

CLIPSCORE_W: float = 2.5
CLIPSCORE_PROMPT: str = "A photo depicts"


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def clip_score_from_embeddings(
    image_embeds: torch.Tensor, caption_embeds: torch.Tensor, w: float = CLIPSCORE_W
) -> torch.Tensor:
    """Per-pair CLIP-S = ``w * max(cos(image, caption), 0)``.

    Args:
        image_embeds: ``(N, D)`` CLIP image embeddings (normalised here).
        caption_embeds: ``(N, D)`` CLIP text embeddings of the prompted captions.
        w: the rescaling weight, 2.5 in the paper.

    Returns:
        ``(N,)`` float32 scores in ``[0, w]``.
    """
    if image_embeds.ndim != 2 or image_embeds.shape != caption_embeds.shape:
        raise ValueError(
            f"image_embeds and caption_embeds must both be (N, D), got {tuple(image_embeds.shape)} "
            f"and {tuple(caption_embeds.shape)}"
        )
    cos = (_normalize(image_embeds) * _normalize(caption_embeds)).sum(-1)
    return w * cos.clamp(min=0)


def max_reference_similarity(
    caption_embeds: torch.Tensor, reference_embeds: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``max(max_r cos(caption, r), 0)`` per caption.

    Args:
        caption_embeds: ``(N, D)`` CLIP text embeddings of the captions.
        reference_embeds: N tensors, the i-th ``(R_i, D)`` with ``R_i >= 1``
            embeddings of the i-th caption's references.

    Returns:
        ``(N,)`` float32 values in ``[0, 1]``.
    """
    if len(reference_embeds) != caption_embeds.shape[0]:
        raise ValueError(
            f"need one reference tensor per caption: {caption_embeds.shape[0]} captions, "
            f"{len(reference_embeds)} reference tensors"
        )
    caps = _normalize(caption_embeds)
    out = []
    for i, refs in enumerate(reference_embeds):
        if refs.ndim != 2 or refs.shape[0] == 0 or refs.shape[1] != caps.shape[1]:
            raise ValueError(
                f"references of caption {i} must be (R >= 1, {caps.shape[1]}), got {tuple(refs.shape)}"
            )
        out.append((_normalize(refs) @ caps[i]).max())
    return torch.stack(out).clamp(min=0)


def ref_clip_score_from_embeddings(
    image_embeds: torch.Tensor,
    caption_embeds: torch.Tensor,
    reference_embeds: Sequence[torch.Tensor],
    w: float = CLIPSCORE_W,
) -> torch.Tensor:
    """Per-pair RefCLIP-S = harmonic mean of CLIP-S and ``max(max_r cos(caption, r), 0)``.

    Shapes as in :func:`clip_score_from_embeddings` and
    :func:`max_reference_similarity`; returns ``(N,)`` (0 where both terms are 0).
    """
    clip_s = clip_score_from_embeddings(image_embeds, caption_embeds, w=w)
    ref_s = max_reference_similarity(caption_embeds, reference_embeds)
    denom = clip_s + ref_s
    return torch.where(denom > 0, 2 * clip_s * ref_s / denom.clamp(min=1e-12), torch.zeros_like(denom))


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _open_image(image: Any) -> Any:
    from PIL import Image

    from .image_io import load_image

    if isinstance(image, (str, os.PathLike, bytes)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    return image  # arrays / tensors go to the image processor as they are


@torch.no_grad()
def encode_clip_images(
    model: Any,
    image_processor: Any,
    images: Sequence[Any],
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised CLIP image embeddings, batched.

    Args:
        model: a transformers ``CLIPModel`` (anything with ``get_image_features``).
        image_processor: its image processor (``CLIPImageProcessor``).
        images: PIL images, or paths opened one batch at a time.
        batch_size: images per forward pass.
        progress: show a tqdm bar.

    Returns:
        ``(N, D)`` float32 on CPU, unit norm.
    """
    from tqdm.auto import tqdm

    device = model.device
    dtype = next(model.parameters()).dtype
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="CLIP images", disable=not progress):
        batch = [_open_image(img) for img in images[start : start + batch_size]]
        pixel_values = image_processor(images=batch, return_tensors="pt")["pixel_values"]
        feats = _features(model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype)))
        chunks.append(_normalize(feats).cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


@torch.no_grad()
def encode_clip_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    prompt: str | None = CLIPSCORE_PROMPT,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised CLIP text embeddings of ``prompt + " " + text``, batched.

    Texts longer than the text tower's context (77 tokens for OpenAI CLIP) are
    truncated, as the reference implementation does.

    Returns:
        ``(N, D)`` float32 on CPU, unit norm.
    """
    from tqdm.auto import tqdm

    if prompt:
        prompt = prompt if prompt.endswith(" ") else prompt + " "
        texts = [prompt + t for t in texts]
    device = model.device
    max_length = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="CLIP texts", disable=not progress):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        feats = _features(
            model.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
        )
        chunks.append(_normalize(feats).cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def load_clip(path: str | os.PathLike, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """Load a ``CLIPModel`` and its processor from a local directory (never the network).

    Returns:
        ``(model, processor)`` with the model in eval mode on ``device``.
    """
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"CLIP model directory {str(path)!r} does not exist: pass a local folder holding a CLIPModel "
            "saved with save_pretrained (e.g. a downloaded openai/clip-vit-base-patch32)"
        )
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    if device is not None:
        model.to(device)
    return model, processor


def compute_clip_score(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    captions: Sequence[str],
    references: Sequence[Sequence[str]] | None = None,
    *,
    batch_size: int = 32,
    w: float = CLIPSCORE_W,
    prompt: str | None = CLIPSCORE_PROMPT,
    per_image: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """CLIP-S and (with references) RefCLIP-S of captions for images, batched.

    Args:
        model: a transformers ``CLIPModel``.
        processor: a ``CLIPProcessor`` (or any object with ``image_processor``
            and ``tokenizer`` attributes).
        images: N PIL images or image paths.
        captions: N candidate captions, ``captions[i]`` describing ``images[i]``.
        references: optional N lists of reference captions (prompted like the
            candidates, as in the reference implementation). Empty lists are
            allowed only when all are empty (then RefCLIP-S is not computed).
        w: CLIP-S weight (2.5).
        prompt: text prefix (``"A photo depicts"``); None for none.
        per_image: also return the per-pair scores as lists.

    Returns:
        ``{"CLIP-S": mean, "RefCLIP-S": mean (with references), "num_images": N}``
        plus ``"CLIP-S_per_image"`` / ``"RefCLIP-S_per_image"`` lists when
        ``per_image``. Scores are in [0, w]; papers print them x100.
    """
    if len(images) != len(captions):
        raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
    if not captions:
        raise ValueError("no captions to score")
    if references is not None:
        if len(references) != len(captions):
            raise ValueError(
                f"need one reference list per caption: {len(captions)} captions, {len(references)} lists"
            )
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        if all(len(r) == 0 for r in references):
            references = None
        elif any(len(r) == 0 for r in references):
            empty = [i for i, r in enumerate(references) if not r]
            raise ValueError(f"RefCLIP-S needs references for every caption; none for items {empty[:5]}")
    image_processor = getattr(processor, "image_processor", processor)
    tokenizer = getattr(processor, "tokenizer", processor)

    image_embeds = encode_clip_images(
        model, image_processor, images, batch_size=batch_size, progress=progress
    )
    caption_embeds = encode_clip_texts(model, tokenizer, captions, batch_size=batch_size, prompt=prompt)
    clip_s = clip_score_from_embeddings(image_embeds, caption_embeds, w=w)
    out: dict[str, Any] = {"CLIP-S": float(clip_s.mean())}
    ref_s = None
    if references is not None:
        flat = [r for refs in references for r in refs]
        flat_embeds = encode_clip_texts(model, tokenizer, flat, batch_size=batch_size, prompt=prompt)
        sizes = [len(refs) for refs in references]
        ref_s = ref_clip_score_from_embeddings(
            image_embeds, caption_embeds, list(flat_embeds.split(sizes)), w=w
        )
        out["RefCLIP-S"] = float(ref_s.mean())
    out["num_images"] = len(captions)
    if per_image:
        out["CLIP-S_per_image"] = clip_s.tolist()
        if ref_s is not None:
            out["RefCLIP-S_per_image"] = ref_s.tolist()
    return out


# ----------------------------------------------------------------------------
# Captioning a dataset and scoring it (shared by `clipcap evaluate` and training's validation)
# ----------------------------------------------------------------------------

# Column headers of the Markdown table, in the order papers print them.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Bleu_1", "BLEU-1"),
    ("Bleu_2", "BLEU-2"),
    ("Bleu_3", "BLEU-3"),
    ("Bleu_4", "BLEU-4"),
    ("METEOR", "METEOR"),
    ("ROUGE_L", "ROUGE-L"),
    ("CIDEr", "CIDEr"),
    ("SPICE", "SPICE"),
    ("CLIP-S", "CLIP-S"),
    ("RefCLIP-S", "RefCLIP-S"),
)
_OPTIONAL_COLUMNS = {"CLIP-S", "RefCLIP-S"}  # shown only when computed or explicitly skipped

MODEL_CARD_START = "<!-- clipcap-evaluate:start -->"
MODEL_CARD_END = "<!-- clipcap-evaluate:end -->"


def _coco_image_id(image_id: Any) -> Any:
    """COCO results use integer ids: "391895" -> 391895; other ids are kept as they are."""
    if isinstance(image_id, str) and image_id.isdigit() and (image_id == "0" or not image_id.startswith("0")):
        return int(image_id)
    return image_id


def _unique_images(records: Any) -> list[dict[str, Any]]:
    """Image-level rows ``{"image_id", "image", "captions"[, "image_embeds"]}``; repeated ids are merged."""
    merged: dict[Any, dict[str, Any]] = {}
    for i, row in enumerate(records):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"dataset record {i} must be a mapping with image_id, image and captions, got {type(row).__name__}"
            )
        if "image_id" not in row or ("image" not in row and "image_embeds" not in row):
            raise ValueError(
                f"dataset record {i} needs 'image_id' and 'image' (or 'image_embeds'); it has {sorted(row)}. "
                "Read data with modeling_clipcap.data.load_caption_dataset."
            )
        refs = row.get("captions", row.get("caption"))
        refs = [refs] if isinstance(refs, str) else list(refs or [])
        key = _coco_image_id(row["image_id"])
        if key in merged:
            known = merged[key]["captions"]
            known.extend(r for r in refs if r not in known)
            continue
        entry = {"image_id": key, "captions": refs}
        for name in ("image", "image_embeds"):
            if name in row and row[name] is not None:
                entry[name] = row[name]
        merged[key] = entry
    return list(merged.values())


@torch.no_grad()
def generate_captions(
    model: Any,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    on_bad_image: str = "fail",
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """Caption unique images in batches, through the library's one captioning path
    (:func:`modeling_clipcap.captioning.caption_items`).

    Args:
        model: a ClipCap model (``generate(pixel_values=... | image_embeds=...)`` returning new tokens only).
        processor: its ``ClipCapProcessor`` (images -> ``pixel_values`` (B, 3, H, W); ``batch_decode``).
        records: rows with ``image_id`` and ``image`` (path, ``{"bytes", "path"}`` or PIL image) or
            ``image_embeds`` (D,) precomputed embeddings (then no image is read).
        num_beams, max_new_tokens: decoding settings; None keeps the model's generation config
            (``max_new_tokens`` falls back to 30 when that has none).
        on_bad_image: ``"fail"`` raises on an unreadable image; ``"skip"`` leaves it out and reports it
            (:func:`modeling_clipcap.image_io.check_bad_image_policy`).

    Returns:
        ``(predictions, skipped)``: ``[{"image_id", "caption"}]`` in record order, and
        ``[(image_id, reason)]`` for images skipped under ``on_bad_image="skip"``.
    """
    from tqdm.auto import tqdm

    from .captioning import caption_items

    kwargs: dict[str, Any] = dict(generation_kwargs or {})
    if num_beams is not None:
        kwargs["num_beams"] = num_beams
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    elif "max_new_tokens" not in kwargs and getattr(model.generation_config, "max_new_tokens", None) is None:
        kwargs["max_new_tokens"] = 30
    predictions: list[dict[str, Any]] = []
    skipped: list[tuple[Any, str]] = []
    with tqdm(total=len(records), desc="captioning", unit="img", disable=not progress) as bar:
        for image_id, captions, error in caption_items(
            model, processor, records, batch_size=batch_size, on_bad_image=on_bad_image, **kwargs
        ):
            bar.update(1)
            if error is not None:
                skipped.append((image_id, error))
                continue
            if len(captions) != 1:
                raise ValueError(
                    f"generate returned {len(captions)} captions for image {image_id!r}; "
                    "evaluation needs num_return_sequences=1"
                )
            predictions.append({"image_id": image_id, "caption": captions[0]})
    return predictions, skipped


def evaluate_model(
    model: Any,
    processor: Any,
    dataset_records: Any,
    *,
    batch_size: int = 16,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    spice: bool | None = False,
    meteor: bool = True,
    clip_model: Any = None,
    clip_processor: Any = None,
    on_bad_image: str = "fail",
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Caption every unique image of a dataset and score the captions against its references.

    The code path of ``clipcap evaluate`` and of training's validation.

    Args:
        model, processor: a ClipCap model and its processor.
        dataset_records: image-level rows ``{"image_id", "image", "captions"}`` (the schema of
            :func:`modeling_clipcap.data.load_caption_dataset`; a ``datasets.Dataset`` or a list of
            dicts). Rows with ``image_embeds`` (D,) are captioned from the embeddings. Repeated ids
            are merged (their references pooled).
        batch_size, num_beams, max_new_tokens, generation_kwargs: decoding (see :func:`generate_captions`).
        spice, meteor: passed to :func:`compute_caption_metrics`.
        clip_model, clip_processor: optional ``CLIPModel`` + ``CLIPProcessor`` for CLIP-S / RefCLIP-S.
        on_bad_image: ``"fail"`` or ``"skip"`` (skipped images are listed in ``metrics["skipped_images"]``).

    Returns:
        ``(predictions, metrics)``: ``[{"image_id", "caption"}]`` (the COCO results format) and the
        dict of :func:`compute_caption_metrics` (plus ``CLIP-S`` / ``RefCLIP-S`` with a CLIP model).
    """
    records = _unique_images(dataset_records)
    if not records:
        raise ValueError("the dataset has no images to caption")
    without_refs = [r["image_id"] for r in records if not r["captions"]]
    if without_refs:
        raise ValueError(f"{len(without_refs)} image(s) have no reference captions, e.g. {without_refs[:3]}")
    predictions, skipped_images = generate_captions(
        model,
        processor,
        records,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        generation_kwargs=generation_kwargs,
        on_bad_image=on_bad_image,
        progress=progress,
    )
    if not predictions:
        raise ValueError("no image could be read: nothing to score")
    by_id = {r["image_id"]: r for r in records}
    pred_map = {p["image_id"]: p["caption"] for p in predictions}
    refs = {key: by_id[key]["captions"] for key in pred_map}
    metrics = compute_caption_metrics(pred_map, refs, spice=spice, meteor=meteor)
    if clip_model is not None:
        if clip_processor is None:
            raise ValueError("clip_model needs its clip_processor (a CLIPProcessor)")
        if any("image" not in by_id[key] for key in pred_map):
            metrics["skipped"]["CLIP-S"] = "records carry image embeddings only; CLIPScore needs the images"
        else:
            from .image_io import load_image

            clip = compute_clip_score(
                clip_model,
                clip_processor,
                [load_image(by_id[key]["image"]) for key in pred_map],
                list(pred_map.values()),
                [refs[key] for key in pred_map],
                batch_size=batch_size,
            )
            metrics["CLIP-S"] = clip["CLIP-S"]
            metrics["RefCLIP-S"] = clip["RefCLIP-S"]
    if skipped_images:
        metrics["skipped_images"] = [[_json_id(i), reason] for i, reason in skipped_images]
    return predictions, metrics


def _json_id(image_id: Any) -> Any:
    return image_id if isinstance(image_id, (int, str)) else str(image_id)


def _skip_note(reason: str) -> str:
    return reason.replace("|", "\\|").replace("\n", " ")


def render_metrics_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """A Markdown table of the scores x100 with two decimals, as papers print them.

    Columns follow :data:`TABLE_COLUMNS`; a skipped metric shows "–" and its reason is listed
    below the table; CLIP-S / RefCLIP-S appear only when computed or skipped.
    """
    skipped = dict(metrics.get("skipped", {}))
    columns = [
        (key, label)
        for key, label in TABLE_COLUMNS
        if key not in _OPTIONAL_COLUMNS or key in metrics or key in skipped
    ]
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| " + " | ".join(label for _, label in columns) + " |")
    lines.append("|" + "|".join("---:" for _ in columns) + "|")
    cells = []
    for key, _ in columns:
        value = metrics.get(key)
        cells.append(f"{100 * float(value):.2f}" if value is not None else "–")
    lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if "num_images" in metrics:
        refs = f", {metrics['num_references']} references" if "num_references" in metrics else ""
        notes.append(f"{metrics['num_images']} images{refs}; scores x100 (pycocoevalcap, PTB tokenizer).")
    if metrics.get("tokenizer") == "simple":
        notes.append(
            "Tokenizer: simple fallback (java missing), not the PTB tokenizer: not comparable to papers."
        )
    for key, reason in skipped.items():
        notes.append(f"{key} skipped: {_skip_note(reason)}")
    if notes:
        lines.append("")
        lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines) + "\n"


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
    from huggingface_hub import EvalResult, ModelCard

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


# ----------------------------------------------------------------------------
# `clipcap evaluate`
# ----------------------------------------------------------------------------


def add_cli_arguments(parser: Any) -> None:
    """Arguments of ``clipcap evaluate`` (see :func:`cli_main`)."""
    from .cli import add_bool_argument
    from .image_io import BAD_IMAGE_POLICIES

    parser.add_argument(
        "--model",
        required=True,
        help="a saved ClipCap model folder (save_pretrained) or a Hugging Face Hub model id",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="captions: Karpathy dataset_coco.json, COCO captions JSON, metadata.jsonl/csv, or a folder with one",
    )
    parser.add_argument("--image_dir", default=None, help="folder the data's image paths are relative to")
    parser.add_argument(
        "--split", default="test", help="split of a Karpathy JSON / data folder (default: test)"
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to write predictions.json, metrics.json, metrics.md (default: outputs/evaluate/<split>)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="images per generate call (default 16)")
    parser.add_argument(
        "--num_beams", type=int, default=None, help="beam size (default: the model's generation config)"
    )
    parser.add_argument(
        "--max_new_tokens", type=int, default=None, help="caption length limit (default: model's, else 30)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N images (quick checks)"
    )
    parser.add_argument(
        "--spice",
        choices=("auto", "on", "off"),
        default="off",
        help="SPICE: off (default; it needs Java <= 11 and the Stanford CoreNLP 3.6.0 jars, which nothing here "
        "downloads), on (an error when it cannot run), auto (computed when it can run, else skipped with why)",
    )
    add_bool_argument(
        parser, "meteor", default=True, help="score METEOR (--no_meteor saves ~10 s of java start-up)"
    )
    parser.add_argument(
        "--clip_model", default=None, help="local CLIPModel folder: also report CLIP-S and RefCLIP-S"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--on_bad_image",
        choices=BAD_IMAGE_POLICIES,
        default="fail",
        help="unreadable images: stop (default) or skip and report them",
    )
    add_bool_argument(
        parser, "update_model_card", help="write the metrics table into the model directory's README.md"
    )
    add_bool_argument(parser, "progress", default=True, help="show a progress bar")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_evaluation(args: Any) -> dict[str, Any]:
    """Load model, processor and data from ``args`` (see :func:`add_cli_arguments`), evaluate, write outputs.

    Returns ``{"predictions", "metrics", "output_dir", "files"}``.
    """
    from . import data as data_lib
    from .captioning import load_captioner

    model_dir = Path(args.model)
    if args.update_model_card and not model_dir.is_dir():
        raise ValueError(
            f"--update_model_card writes the table into the model folder's README.md, and --model {args.model} is "
            "not a local folder: download it (huggingface-cli download), or leave the flag out."
        )
    # the one loader (a folder or a Hub id; --device checked before weights are read), in the saved precision
    model, processor = load_captioner(args.model, dtype="auto", device=args.device)
    device = model.device
    dataset, report = data_lib.load_caption_dataset(
        args.data, split=args.split, image_dir=args.image_dir, on_bad_image=args.on_bad_image
    )
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    clip_model = clip_processor = None
    if args.clip_model:
        clip_model, clip_processor = load_clip(args.clip_model, device=device)
    spice = {"auto": None, "on": True, "off": False}[args.spice]
    predictions, metrics = evaluate_model(
        model,
        processor,
        dataset,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        spice=spice,
        meteor=args.meteor,
        clip_model=clip_model,
        clip_processor=clip_processor,
        on_bad_image=args.on_bad_image,
        progress=args.progress,
    )
    metrics["config"] = {
        "model": str(model_dir),
        "data": str(args.data),
        "split": args.split,
        "image_dir": args.image_dir,
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "clip_model": args.clip_model,
    }
    data_report = report.to_dict()
    # One list of every image left out, whether the reader dropped it (missing file) or it failed to decode.
    skipped = [list(item) for item in data_report.pop("skipped_images", None) or []]
    skipped += metrics.pop("skipped_images", None) or []
    metrics["data_report"] = data_report
    if skipped:
        metrics["skipped_images"] = skipped
        metrics["num_skipped_images"] = len(skipped)

    output_dir = Path(args.output_dir) if args.output_dir else Path("outputs") / "evaluate" / str(args.split)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "predictions": output_dir / "predictions.json",
        "metrics": output_dir / "metrics.json",
        "table": output_dir / "metrics.md",
    }
    _write_json(
        files["predictions"],
        [{"image_id": _json_id(p["image_id"]), "caption": p["caption"]} for p in predictions],
    )
    _write_json(files["metrics"], metrics)
    title = f"**{model_dir.name}** on `{Path(args.data).name}` ({args.split})"
    table = render_metrics_table(metrics, title=title)
    files["table"].write_text(table, encoding="utf-8")
    if args.update_model_card:
        files["model_card"] = update_model_card(
            model_dir, table, metrics=metrics, dataset_name=Path(args.data).name, split=args.split
        )
    return {"predictions": predictions, "metrics": metrics, "output_dir": output_dir, "files": files}


def cli_main(args: Any) -> int:
    """Run ``clipcap evaluate``; returns the process exit status (2 for bad input)."""
    import sys

    from .data import CaptionDataError

    try:
        result = run_evaluation(args)
    except (CaptionDataError, FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"clipcap evaluate: error: {err}", file=sys.stderr)
        return 2
    print(render_metrics_table(result["metrics"]))
    if result["metrics"].get("num_skipped_images"):
        print(
            f"bad images skipped: {result['metrics']['num_skipped_images']} "
            f"(listed under skipped_images in {result['files']['metrics']})",
            file=sys.stderr,
        )
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0
