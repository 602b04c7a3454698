"""``clipcap env``: versions and hardware for bug reports."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import pytest
import torch
import transformers

from modeling_clipcap.cli import main
from modeling_clipcap.environment import cpu_info

AMX_CPU = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile avx_vnni
"""
AVX2_CPU = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 fma
"""
ARM_CPU = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm
"""


def test_env_prints_the_versions_that_matter(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"- transformers version: {transformers.__version__}" in out
    assert f"- torch version: {torch.__version__}" in out
    assert f"- accelerate version: {metadata.version('accelerate')}" in out
    assert f"- datasets version: {metadata.version('datasets')}" in out
    assert f"- huggingface_hub version: {metadata.version('huggingface_hub')}" in out
    assert f"- modeling_clipcap version: {metadata.version('modeling_clipcap')}" in out
    assert f"- Python version: {platform.python_version()}" in out
    assert "- Native bf16 on the CPU: " in out and "- Accelerator" in out


def test_env_json_is_machine_readable(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["transformers"] == transformers.__version__
    assert info["cpu"]["logical_cpus"] >= 1
    assert isinstance(info["cpu"]["native_bf16"], bool)
    assert info["accelerators"] == [] or info["accelerators"][0]["device"].startswith(("cuda", "mps"))


@pytest.mark.parametrize(
    ("text", "name", "native", "extensions"),
    [
        (
            AMX_CPU,
            "Intel(R) Xeon(R) Platinum 8480+",
            True,
            ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"],
        ),
        (AVX2_CPU, "AMD EPYC", False, ["avx2", "fma"]),
        (ARM_CPU, None, True, []),
    ],
)
def test_cpu_detection_tells_native_bf16(text, name, native, extensions):
    info = cpu_info(text)
    assert info["native_bf16"] is native
    assert info["extensions"][: len(extensions)] == extensions
    if name is not None:
        assert info["cpu"] == name
