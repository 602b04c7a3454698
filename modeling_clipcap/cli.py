"""The ``clipcap`` command line: ``clipcap caption | convert | evaluate | embed | index | export | env | app |
merge``.

Each sub-command lives in the module that owns its concern and exposes two
functions:

* ``add_cli_arguments(parser: argparse.ArgumentParser) -> None``
* ``cli_main(args: argparse.Namespace) -> int`` (the process exit status)

This file only wires them together, so ``clipcap --help`` lists every command, and holds the one flag style
of every command and training script: booleans from :func:`add_bool_argument`, a flag that sets a
``ClipCapConfig`` field named as the field, and earlier spellings kept as hidden aliases
(:func:`add_renamed_argument`) that print the new one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("modeling_clipcap.captioning", "caption image files or folders with a ClipCap model"),
    "convert": ("modeling_clipcap.convert_original", "convert an original ClipCap checkpoint to this format"),
    "evaluate": (
        "modeling_clipcap.evaluation",
        "caption a dataset and score it (BLEU, METEOR, ROUGE-L, CIDEr; SPICE on request)",
    ),
    "embed": (
        "modeling_clipcap.embed",
        "precompute image embeddings of WebDataset / Parquet shards (Parquet out)",
    ),
    "index": (
        "modeling_clipcap.retrieval",
        "embed captions into a retrieval datastore (Parquet + faiss) for retrieval-augmented captioning",
    ),
    "export": (
        "modeling_clipcap.onnx_export",
        "export a model to ONNX graphs for ONNX Runtime (--int8: also int8 graphs)",
    ),
    "env": ("modeling_clipcap.environment", "print versions and hardware to paste into a bug report"),
    "app": ("modeling_clipcap.app", "open a captioning web page and API (Gradio; needs the app extra)"),
    "merge": (
        "modeling_clipcap.adapters",
        "fold a PEFT adapter folder into its base ClipCap model (needs peft)",
    ),
}


def add_bool_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    default: bool | None = False,
    help: str | None = None,
    takes_value: bool = True,
) -> None:
    """A boolean flag in transformers' ``HfArgumentParser`` style, the one style of every command and script.

    ``--NAME`` alone is true, ``--NAME true|false`` (yes/no, 1/0) sets it and ``--no_NAME`` is false.
    HfArgumentParser gives the ``--no_`` twin to flags that default to true only; here every flag has it, so a
    true from a preset or an earlier argument can be turned off. The help ends with the default (``None``: the
    caller's help says what unset means).

    ``takes_value=False``: ``--NAME`` / ``--no_NAME`` only, for a command with positional arguments, where a
    flag taking an optional value would swallow the path after it (``clipcap caption --json a.jpg``).
    """
    from transformers.hf_argparser import string_to_bool

    text = help or ""
    if default is not None:
        stated = str(default).lower()
        text = f"{text} Default: {stated}." if text.endswith(".") else f"{text} (default: {stated})".strip()
    if takes_value:
        parser.add_argument(
            f"--{name}",
            type=string_to_bool,
            nargs="?",
            const=True,
            default=default,
            metavar="true|false",
            help=text,
        )
        twin = f"same as --{name} false"
    else:
        parser.add_argument(f"--{name}", action="store_true", default=default, help=text)
        twin = f"turn --{name} off"
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=twin)


class RenamedFlag(argparse.Action):
    """A user's earlier spelling of a flag: hidden from ``--help``, it sets what the new flag sets and prints one
    line naming the new spelling (a plain line on stderr: a DeprecationWarning would be invisible by default)."""

    def __init__(self, option_strings: list[str], dest: str, new_flag: str, **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: {option_string} is now spelled {self.new_flag}; "
            "the old spelling still works for now and will be removed.",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_renamed_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, old_flag: str, new_flag: str
) -> None:
    """Keep ``old_flag`` working as a hidden alias of ``new_flag`` (already added to ``parser``): a switch
    (``--quiet`` for ``--no_progress``) sets the new switch's value, a flag taking a value (``--num_layers`` for
    ``--mapping_num_layers``) takes the same value."""
    new = parser._option_string_actions[new_flag]
    if new.nargs == 0:  # store_true / store_false
        kwargs: dict[str, Any] = {"nargs": 0, "const": new.const}
    else:
        kwargs = {"nargs": new.nargs, "const": new.const, "type": new.type, "choices": new.choices}
        kwargs["metavar"] = new.metavar
    parser.add_argument(old_flag, action=RenamedFlag, dest=new.dest, new_flag=new_flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per available command."""
    parser = argparse.ArgumentParser(
        prog="clipcap", description="ClipCap: CLIP prefix captioning on transformers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a command whose module is not part of this build
            if err.name != module_name:
                raise
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(sub)
        sub.set_defaults(_cli_main=module.cli_main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clipcap`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("caption", "evaluate"):
        # process-wide malloc settings that speed up batched CPU decoding (CLIPCAP_MALLOC_TUNING=0: off)
        from .cpu_tuning import tune_cpu_allocator_from_env

        tune_cpu_allocator_from_env()
    return int(args._cli_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
