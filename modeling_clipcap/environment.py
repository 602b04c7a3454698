"""``clipcap env``: the versions and hardware to paste into a bug report (like ``transformers env``).

Library use::

    from modeling_clipcap.environment import collect_environment, format_environment
    print(format_environment(collect_environment()))
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_cli_arguments", "cli_main", "collect_environment", "cpu_info", "format_environment"]

#: Distributions whose versions decide how the package behaves (the declared dependencies that matter).
PACKAGES = (
    "modeling_clipcap",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "evaluate",
    "pillow",
    "numpy",
    "gradio",
)

#: x86 CPU flags that decide bf16 speed (native bf16 dot products or AMX tiles) and fp32 kernels.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, the vector extensions that decide bf16 speed, and whether bf16 matrix products are native.

    ``native_bf16`` is true on x86 with AVX512-BF16 or AMX-BF16, and on ARM with the ``bf16`` feature;
    elsewhere torch emulates bf16 (about 100x slower than fp32 on an AVX2-only CPU). ``cpuinfo`` is the text
    of ``/proc/cpuinfo`` (read when not given).
    """
    model_name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        match = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", text, re.MULTILINE)
        model_name = match.group(1).strip() if match else model_name
        match = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
        flags = set(match.group(1).split()) if match else set()
    except OSError:
        pass
    return {
        "cpu": model_name,
        "extensions": [f for f in CPU_FLAGS if f in flags],
        "native_bf16": bool({"avx512_bf16", "amx_bf16", "bf16"} & flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
    }


def _accelerators() -> list[dict[str, Any]]:
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            devices.append(
                {
                    "device": f"cuda:{index}",
                    "name": torch.cuda.get_device_name(index),
                    "native_bf16": bool(torch.cuda.is_bf16_supported()),
                }
            )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"device": "mps", "name": "Apple MPS", "native_bf16": None})
    return devices


def collect_environment() -> dict[str, Any]:
    """Package versions, Python, platform, CPU and accelerators, as a JSON-serialisable dict."""
    return {
        "packages": {name: _version(name) for name in PACKAGES},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "torch_cuda": torch.version.cuda,
        "accelerators": _accelerators(),
    }


def format_environment(info: dict[str, Any]) -> str:
    """The ``collect_environment`` dict as a Markdown list, ready to paste into an issue."""
    cpu = info["cpu"]
    lines = [f"- {name} version: {version}" for name, version in info["packages"].items()]
    lines += [
        f"- Python version: {info['python']}",
        f"- Platform: {info['platform']}",
        f"- CPU: {cpu['cpu']} ({cpu['logical_cpus']} logical CPUs; {', '.join(cpu['extensions']) or 'no listed extensions'}; "
        f"torch kernels: {cpu['torch_cpu_capability']})",
        f"- Native bf16 on the CPU: {'yes' if cpu['native_bf16'] else 'no (emulated: use float32 on this CPU)'}",
        f"- torch CUDA build: {info['torch_cuda'] or 'none (CPU build)'}",
    ]
    if info["accelerators"]:
        for device in info["accelerators"]:
            bf16 = {True: "yes", False: "no", None: "unknown"}[device["native_bf16"]]
            lines.append(f"- Accelerator {device['device']}: {device['name']} (native bf16: {bf16})")
    else:
        lines.append("- Accelerator: none")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_bool_argument

    add_bool_argument(parser, "json", help="print a JSON object instead of the Markdown list")


def cli_main(args: argparse.Namespace) -> int:
    info = collect_environment()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("Copy and paste the text below into your GitHub issue.\n")
        print(format_environment(info))
    return 0
