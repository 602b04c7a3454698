"""The ``clipcap`` command line: ``clipcap caption | convert | evaluate | embed | env | app``.

Each sub-command lives in the module that owns its concern and exposes two
functions:

* ``add_cli_arguments(parser: argparse.ArgumentParser) -> None``
* ``cli_main(args: argparse.Namespace) -> int`` (the process exit status)

This file only wires them together, so ``clipcap --help`` lists every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("modeling_clipcap.captioning", "caption image files or folders with a ClipCap model"),
    "convert": ("modeling_clipcap.convert_original", "convert an original ClipCap checkpoint to this format"),
    "evaluate": (
        "modeling_clipcap.evaluation",
        "caption a dataset and score it (BLEU, METEOR, ROUGE-L, CIDEr, SPICE)",
    ),
    "embed": (
        "modeling_clipcap.embed",
        "precompute image embeddings of WebDataset / Parquet shards (Parquet out)",
    ),
    "env": ("modeling_clipcap.environment", "print versions and hardware to paste into a bug report"),
    "app": ("modeling_clipcap.app", "open a captioning web page and API (Gradio; needs the app extra)"),
}


def add_bool_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    default: bool | None = False,
    help: str | None = None,
    negative: bool | None = None,
) -> None:
    """A boolean flag in transformers' ``HfArgumentParser`` style, the one style of every command here.

    ``--NAME`` alone is true, ``--NAME true|false`` (yes/no, 1/0) sets it; a flag that is on by default
    (or when ``negative`` is set) also gets ``--no_NAME``.
    """
    from transformers.hf_argparser import string_to_bool

    parser.add_argument(
        f"--{name}",
        type=string_to_bool,
        nargs="?",
        const=True,
        default=default,
        metavar="true|false",
        help=help,
    )
    with_negative = (default is True) if negative is None else negative
    if with_negative:
        parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"same as --{name} false")


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
