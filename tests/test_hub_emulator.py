"""The local Hub emulator, driven by the real ``huggingface_hub`` / ``transformers`` clients in subprocesses."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hub_emulator import FAKE_USER, HubEmulator, iter_files, run_python


def _last_json(proc) -> dict:
    """The JSON object a subprocess printed on its last stdout line."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _make_folder(folder, scale: float = 1.0) -> None:
    """config.json, model.safetensors (written with safetensors), a .py file, README.md and a nested file."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "scale": scale}))
    save_file(
        {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale}, folder / "model.safetensors"
    )
    (folder / "modeling_toy.py").write_text("def scale(x):\n    return x * 2\n")
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- toy\n---\n# Toy model\n")
    (folder / "extra").mkdir(exist_ok=True)
    (folder / "extra" / "notes.txt").write_text("nested file\n")


UPLOAD_AND_DOWNLOAD = """
import json, os
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

api = HfApi()
url = api.create_repo("{repo}")
info = api.upload_folder(repo_id="{repo}", folder_path={folder!r}, commit_message="add toy model")
files = sorted(api.list_repo_files("{repo}"))
tree_top = sorted([e.path, type(e).__name__] for e in api.list_repo_tree("{repo}"))
model_info = api.model_info("{repo}", files_metadata=True)
downloads = {{name: hf_hub_download("{repo}", name) for name in files}}
snapshot = snapshot_download("{repo}")
print(json.dumps({{
    "url_repo_id": url.repo_id,
    "commit": info.oid,
    "files": files,
    "tree_top": tree_top,
    "sha": model_info.sha,
    "siblings": sorted(s.rfilename for s in model_info.siblings),
    "lfs_siblings": sorted(s.rfilename for s in model_info.siblings if s.lfs is not None),
    "downloads": downloads,
    "snapshot": snapshot,
}}))
"""


@pytest.mark.parametrize("lfs", ["auto", "never"])
def test_upload_folder_then_download_is_byte_identical(tmp_path, lfs):
    with HubEmulator(lfs=lfs, home_root=tmp_path) as hub:
        folder = tmp_path / "upload"
        _make_folder(folder)
        local = dict(iter_files(folder))
        repo = "org/toy"
        out = _last_json(hub.run_python(UPLOAD_AND_DOWNLOAD.format(repo=repo, folder=str(folder))))

        expected = sorted([*local, ".gitattributes"])
        assert out["url_repo_id"] == repo
        assert out["files"] == expected
        assert out["siblings"] == expected
        assert out["sha"] == out["commit"] == hub.history(repo)[0].oid
        assert ["extra", "RepoFolder"] in out["tree_top"] and ["config.json", "RepoFile"] in out["tree_top"]
        assert ["extra/notes.txt", "RepoFile"] not in out["tree_top"]  # not recursive by default
        # what the server stored is what was uploaded
        stored = hub.files(repo)
        assert {k: v for k, v in stored.items() if k != ".gitattributes"} == local
        # hf_hub_download and snapshot_download give the same bytes
        for name, content in local.items():
            with open(out["downloads"][name], "rb") as f:
                assert f.read() == content, name
        assert dict(iter_files(out["snapshot"])) == stored

        uploaded_through_lfs = ("POST", f"/{repo}.git/info/lfs/objects/batch") in hub.requests
        if lfs == "auto":  # *.safetensors is LFS-tracked by the default .gitattributes, like on the Hub
            assert hub.lfs_files(repo) == ["model.safetensors"]
            assert out["lfs_siblings"] == ["model.safetensors"]
            assert uploaded_through_lfs
        else:
            assert hub.lfs_files(repo) == [] and out["lfs_siblings"] == []
            assert not uploaded_through_lfs
        hub.assert_all_handled()


def test_second_commit_is_seen_by_downloads_and_old_revision_stays(hub_server, tmp_path):
    repo = "org/evolving"
    folder = tmp_path / "v1"
    _make_folder(folder, scale=1.0)
    hf_home = tmp_path / "shared_home"  # one cache for all calls: the update must not be hidden by it
    first = _last_json(
        hub_server.run_python(
            f"""
            import json
            from huggingface_hub import HfApi, hf_hub_download
            api = HfApi()
            api.create_repo("{repo}")
            info = api.upload_folder(repo_id="{repo}", folder_path={str(folder)!r}, commit_message="v1")
            print(json.dumps({{"commit": info.oid, "config": open(hf_hub_download("{repo}", "config.json")).read()}}))
            """,
            {"HF_HOME": str(hf_home)},
        )
    )
    _make_folder(folder, scale=3.0)
    (folder / "extra" / "notes.txt").unlink()
    (folder / "extra").rmdir()
    second = _last_json(
        hub_server.run_python(
            f"""
            import json
            from huggingface_hub import HfApi, hf_hub_download, snapshot_download
            api = HfApi()
            info = api.upload_folder(repo_id="{repo}", folder_path={str(folder)!r}, commit_message="v2",
                                     delete_patterns=["extra/*"])
            print(json.dumps({{
                "commit": info.oid,
                "files": sorted(api.list_repo_files("{repo}")),
                "config": open(hf_hub_download("{repo}", "config.json")).read(),
                "weights": hf_hub_download("{repo}", "model.safetensors"),
                "old_config": open(hf_hub_download("{repo}", "config.json", revision="{first["commit"]}")).read(),
                "old_files": sorted(api.list_repo_files("{repo}", revision="{first["commit"]}")),
                "snapshot": snapshot_download("{repo}"),
                "commits": [c.commit_id for c in api.list_repo_commits("{repo}")],
            }}))
            """,
            {"HF_HOME": str(hf_home)},
        )
    )
    assert second["commit"] != first["commit"]
    assert json.loads(first["config"])["scale"] == 1.0
    assert json.loads(second["config"])["scale"] == 3.0
    assert json.loads(second["old_config"])["scale"] == 1.0
    assert "extra/notes.txt" in second["old_files"] and "extra/notes.txt" not in second["files"]
    with open(second["weights"], "rb") as f:
        assert f.read() == (folder / "model.safetensors").read_bytes()
    assert dict(iter_files(second["snapshot"])) == hub_server.files(repo)
    history = [c.oid for c in hub_server.history(repo)]
    assert second["commits"] == history and history[:2] == [second["commit"], first["commit"]]
    hub_server.assert_all_handled()


def test_unchanged_files_are_not_recommitted(hub_server, tmp_path):
    folder = tmp_path / "same"
    _make_folder(folder)
    out = _last_json(
        hub_server.run_python(
            f"""
            import json
            from huggingface_hub import HfApi
            api = HfApi()
            api.create_repo("org/same")
            a = api.upload_folder(repo_id="org/same", folder_path={str(folder)!r}).oid
            b = api.upload_folder(repo_id="org/same", folder_path={str(folder)!r}).oid
            print(json.dumps({{"a": a, "b": b}}))
            """
        )
    )
    # the preupload answer carries the stored oids, so the client sees nothing changed and skips the commit
    assert out["a"] == out["b"] == hub_server.history("org/same")[0].oid
    assert len(hub_server.history("org/same")) == 2  # initial .gitattributes commit + one upload


def test_errors_map_to_the_clients_typed_exceptions(hub_server):
    out = _last_json(
        hub_server.run_python(
            """
            import json
            from huggingface_hub import HfApi, hf_hub_download
            from huggingface_hub.errors import (
                EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
            )
            api = HfApi()
            result = {}

            def record(name, fn, *errors):
                try:
                    fn()
                    result[name] = "no error"
                except errors as e:
                    result[name] = type(e).__name__
                except Exception as e:
                    result[name] = "unexpected " + type(e).__name__ + ": " + str(e)

            record("download_missing_repo", lambda: hf_hub_download("org/missing", "config.json"),
                   RepositoryNotFoundError)
            record("info_missing_repo", lambda: api.model_info("org/missing"), RepositoryNotFoundError)
            result["repo_exists"] = [api.repo_exists("org/missing")]
            url = api.create_repo("errs")  # no namespace: the token's user
            result["namespace"] = url.namespace
            repo = url.repo_id
            result["repo_exists"].append(api.repo_exists(repo))
            record("create_again", lambda: api.create_repo(repo), HfHubHTTPError)
            record("create_exist_ok", lambda: api.create_repo(repo, exist_ok=True), HfHubHTTPError)
            record("missing_file", lambda: hf_hub_download(repo, "nope.bin"), EntryNotFoundError)
            record("file_exists", lambda: result.setdefault(
                "exists", [api.file_exists(repo, ".gitattributes"), api.file_exists(repo, "nope.bin")]))
            record("missing_revision", lambda: hf_hub_download(repo, ".gitattributes", revision="v9"),
                   RevisionNotFoundError)
            record("bad_token", lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo,
                                                        token="hf_wrong_token_000000000000000000"),
                   HfHubHTTPError)
            print(json.dumps(result))
            """
        )
    )
    assert out["download_missing_repo"] == "RepositoryNotFoundError"
    assert out["info_missing_repo"] == "RepositoryNotFoundError"
    assert out["namespace"] == FAKE_USER
    assert out["repo_exists"] == [False, True]
    assert out["create_again"] == "HfHubHTTPError"  # 409 without exist_ok
    assert out["create_exist_ok"] == "no error"
    assert out["missing_file"] in ("EntryNotFoundError", "RemoteEntryNotFoundError")
    assert out["exists"] == [True, False] and out["file_exists"] == "no error"
    assert out["missing_revision"] == "RevisionNotFoundError"
    assert out["bad_token"] == "HfHubHTTPError"
    assert hub_server.files(f"{FAKE_USER}/errs").keys() == {
        ".gitattributes"
    }  # nothing written with a bad token


TINY_GPT2 = """
from transformers import GPT2Config, GPT2LMHeadModel
import torch
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
"""


@pytest.mark.slow
def test_transformers_upload_push_to_hub_and_from_pretrained(hub_server, tmp_path):
    saved = tmp_path / "saved"
    hub_server.run_python(
        TINY_GPT2
        + f"""
model.save_pretrained({str(saved)!r})
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("org/tiny-gpt2")
api.upload_folder(repo_id="org/tiny-gpt2", folder_path={str(saved)!r})
model.push_to_hub("org/tiny-gpt2-pushed")
model.push_to_hub("tiny-gpt2-user")  # no namespace: the token's user
from conftest import build_tiny_tokenizer
build_tiny_tokenizer().push_to_hub("org/tiny-gpt2-pushed")
""",
        cwd=Path(__file__).parent,  # for `import conftest`
    )
    assert "model.safetensors" in hub_server.lfs_files("org/tiny-gpt2-pushed")
    assert "README.md" in hub_server.files("org/tiny-gpt2-pushed")  # model card written by push_to_hub
    assert f"{FAKE_USER}/tiny-gpt2-user" in {repo_id for _, repo_id in hub_server.repos}

    out = _last_json(
        hub_server.run_python(
            f"""
            import json
            import torch
            from safetensors.torch import load_file
            from transformers import AutoConfig, GPT2LMHeadModel
            reference = load_file({str(saved / "model.safetensors")!r})
            result = {{}}
            for repo in ("org/tiny-gpt2", "org/tiny-gpt2-pushed", "{FAKE_USER}/tiny-gpt2-user"):
                config = AutoConfig.from_pretrained(repo)
                model = GPT2LMHeadModel.from_pretrained(repo)
                state = model.state_dict()
                result[repo] = {{
                    "n_embd": config.n_embd, "n_layer": config.n_layer, "vocab": config.vocab_size,
                    "equal": all(torch.equal(state[k], v) for k, v in reference.items()),
                    "n_tensors": len(reference),
                }}
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained("org/tiny-gpt2-pushed")
            result["tokenizer"] = [type(tokenizer).__name__, tokenizer.convert_tokens_to_ids(".")]
            print(json.dumps(result))
            """
        )
    )
    tokenizer_class, dot_id = out.pop("tokenizer")
    assert tokenizer_class.startswith("GPT2Tokenizer") and dot_id == 13
    for repo, res in out.items():
        assert res == {
            "n_embd": 16,
            "n_layer": 1,
            "vocab": 50,
            "equal": True,
            "n_tensors": res["n_tensors"],
        }, repo
        assert res["n_tensors"] > 0
    hub_server.assert_all_handled()


REMOTE_CODE = """
from transformers import PretrainedConfig, PreTrainedModel
import torch


class ToyConfig(PretrainedConfig):
    model_type = "toy-remote"

    def __init__(self, width=4, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.proj(x)
"""


@pytest.mark.slow
def test_trust_remote_code_model_downloads_its_code(hub_server, tmp_path):
    """The ClipCap use case: ``AutoModel.from_pretrained(repo, trust_remote_code=True)`` without the package."""
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "toy_remote.py").write_text(REMOTE_CODE)
    saved = tmp_path / "saved"
    hub_server.run_python(
        f"""
        import torch
        from toy_remote import ToyConfig, ToyModel
        ToyConfig.register_for_auto_class()
        ToyModel.register_for_auto_class("AutoModel")
        torch.manual_seed(0)
        model = ToyModel(ToyConfig(width=4))
        model.save_pretrained({str(saved)!r})
        model.push_to_hub("org/toy-remote")
        """,
        cwd=code_dir,
    )
    assert "toy_remote.py" in hub_server.files("org/toy-remote")
    out = _last_json(
        hub_server.run_python(  # another folder: the class can only come from the downloaded code
            f"""
            import json, torch
            from safetensors.torch import load_file
            from transformers import AutoModel
            model = AutoModel.from_pretrained("org/toy-remote", trust_remote_code=True)
            reference = load_file({str(saved / "model.safetensors")!r})
            state = model.state_dict()
            print(json.dumps({{
                "cls": type(model).__name__, "module": type(model).__module__,
                "equal": sorted(state) == sorted(reference)
                and all(torch.equal(state[k], v) for k, v in reference.items()),
            }}))
            """,
            cwd=tmp_path,
        )
    )
    assert out["cls"] == "ToyModel" and out["module"].startswith("transformers_modules.")
    assert out["equal"]
    hub_server.assert_all_handled()


def test_network_guard_refuses_non_loopback_addresses(hub_server):
    with pytest.raises(AssertionError, match="network guard"):
        run_python(
            """
            import socket
            socket.create_connection(("10.255.255.1", 80), timeout=1)
            """,
            hub_server.env(),
        )
    # loopback is allowed
    run_python(
        f"""
        import urllib.request
        assert urllib.request.urlopen("{hub_server.endpoint}/api/validate-yaml", data=b"{{}}").status == 200
        """,
        hub_server.env(),
    )


def test_env_points_the_client_at_the_emulator(hub_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HTTPS_PROXY", "http://10.0.0.1:3128")
    env = hub_server.env({"EXTRA_VAR": "x"})
    assert env["HF_ENDPOINT"] == hub_server.endpoint and env["HF_ENDPOINT"].startswith("http://127.0.0.1:")
    assert env["HF_TOKEN"] == hub_server.token
    assert "HF_HUB_OFFLINE" not in env and "HTTPS_PROXY" not in env
    assert env["HF_HUB_DISABLE_TELEMETRY"] == "1" and env["HF_HUB_DISABLE_XET"] == "1"
    assert env["EXTRA_VAR"] == "x"
    assert env["HF_HOME"] != hub_server.env()["HF_HOME"]  # a fresh cache each time


def test_emulator_stops_and_frees_its_port(tmp_path):
    hub = HubEmulator(home_root=tmp_path).start()
    endpoint = hub.endpoint
    request = urllib.request.Request(
        f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {hub.token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.load(response)["name"] == hub.user
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=5)
    assert info.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{endpoint}/org/nothing/resolve/main/config.json", timeout=5)
    assert info.value.code == 404 and info.value.headers["X-Error-Code"] == "RepoNotFound"
    hub.stop()
    port = int(endpoint.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(RuntimeError, match="not running"):
        _ = hub.endpoint
