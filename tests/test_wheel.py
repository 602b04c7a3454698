"""The built wheel, installed outside the checkout, carries its presets (every file of each, read by
``modeling_clipcap.presets``): what a ``pip install`` user gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installed_in_a_scratch_venv_loads_every_preset(tmp_path):
    # Build from the checkout, offline: the build backend (setuptools) comes from this environment.
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO_ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
        ]
    )
    (wheel,) = wheels.glob("modeling_clipcap-*.whl")

    # A scratch venv that sees this environment's dependencies (torch, transformers...) but not its editable
    # install of the package: a .pth line adds site-packages as a plain path, whose own .pth files
    # (the editable finder among them) are not run.
    scratch = tmp_path / "venv"
    venv.create(scratch, with_pip=False)
    python = scratch / "bin" / "python"
    scratch_site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    (scratch_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )

    code = """
import json, modeling_clipcap
from modeling_clipcap.presets import find_preset, hub_configs_dir, read_preset
names = sorted(p.name for p in hub_configs_dir().iterdir() if p.is_dir())
print(json.dumps({
    "package": modeling_clipcap.__file__,
    "hub_configs": str(hub_configs_dir()),
    "names": names,
    "presets": {n: {k: v for k, v in read_preset(find_preset(n)).items() if k != "dir"} for n in names},
    "conversion": {n: read_preset(find_preset(n))["preset"].get("stop_token_id")
                   for n in ("coco-mlp", "conceptual-mlp", "coco-transformer")},
}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLIPCAP_HUB_CONFIGS")}
    found = json.loads(_run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(scratch_site)), found["package"]  # the wheel, not the checkout
    assert found["hub_configs"].startswith(str(scratch_site))
    shipped = sorted(p.name for p in (REPO_ROOT / "hub_configs").iterdir() if (p / "config.json").is_file())
    assert set(shipped) <= set(found["names"]), (shipped, found["names"])
    from modeling_clipcap.presets import read_preset

    for name in shipped:  # every file of the one preset schema ships: configs, training args, card, extras
        checkout = {k: v for k, v in read_preset(REPO_ROOT / "hub_configs" / name).items() if k != "dir"}
        assert found["presets"][name] == checkout, name
        assert found["presets"][name]["config"] == json.loads(
            (REPO_ROOT / "hub_configs" / name / "config.json").read_text()
        )
        assert found["presets"][name]["card_template"] and found["presets"][name]["training_args"], name
    assert found["conversion"] == {"coco-mlp": 13, "conceptual-mlp": 13, "coco-transformer": 13}
