"""The field's caption metrics, offline: pycocoevalcap after its PTB tokenizer, and exact match.

:func:`compute_caption_metrics` gives BLEU-1..4, METEOR, ROUGE-L and CIDEr-D computed by ``pycocoevalcap`` after
its PTB tokenizer, with pycocoevalcap's key names (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``,
``CIDEr``), and ``SPICE`` only when asked for (:data:`SPICE_NOT_REQUESTED` says why it is not a default).
Scores are in [0, 1] (CIDEr in [0, 10]); papers print them x100. Metrics that cannot run here are listed
under ``"skipped"`` with the reason and are never reported as 0.

The PTB tokenizer, METEOR and SPICE are Java programs: this module finds the java (and SPICE's jars) that
run them, says why one cannot run, and keeps their output off the terminal. Shared by ``clipcap evaluate``,
the ``coco_caption`` evaluate module under ``metrics/`` and training's validation. CLIPScore is in
:mod:`modeling_clipcap.clip_score`. Nothing in this module touches the network.
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

__all__ = [
    "CAPTION_METRIC_KEYS",
    "SPICE_NOT_REQUESTED",
    "TABLE_COLUMNS",
    "compute_caption_metrics",
    "exact_match_rate",
    "exact_match_text",
    "java_version",
    "parse_java_version",
    "simple_tokenize",
    "spice_dir",
    "spice_java",
    "spice_unavailable_reason",
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

# Every score a report shows (pycocoevalcap's and CLIPScore's) with its column label, in the order papers print
# them: the Markdown table of ``clipcap evaluate`` and the model card's ``model-index`` results.
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
