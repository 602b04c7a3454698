"""Shards given as fsspec URLs: a folder served over HTTP on 127.0.0.1 (``http.server`` in a thread) is read through
``http://127.0.0.1:PORT/...`` patterns exactly as a local folder is, by the shard reader, train.py (streamed, with
loader worker processes) and ``clipcap embed``.

The shards are those of tests/test_webscale.py (3 tars of 5, 4 and 6 samples, one broken image).
"""

from __future__ import annotations

import functools
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO_ROOT, write_tiny_preset
from test_webscale import BROKEN, write_shards

from modeling_clipcap.shards import ShardError, expand_shards, iter_shard_rows, load_shard_captions

sys.path.insert(0, str(REPO_ROOT / "training"))

import train  # noqa: E402

LOCAL = "tars/shard-{0000..0002}.tar"


class _Handler(SimpleHTTPRequestHandler):
    """Serves the folder; remembers the paths of the GET requests (to show the bytes came over HTTP)."""

    requested: list[str]

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # no access log on stderr
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``{"root": local folder, "url": "http://127.0.0.1:PORT", "requested": [...], "keys": [...]}``."""
    root = tmp_path_factory.mktemp("served")
    keys = write_shards(root / "tars")
    (root / "emb").mkdir()
    for i in range(2):
        embeds = torch.arange(i * 48, i * 48 + 48, dtype=torch.float32).reshape(2, 24).tolist()
        table = pa.table(
            {"key": [f"e{i}-0", f"e{i}-1"], "caption": ["a cat.", "a dog."], "image_embeds": embeds}
        )
        pq.write_table(table, root / "emb" / f"emb-{i}.parquet")
    requested: list[str] = []
    handler = type("Handler", (_Handler,), {"requested": requested})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {
            "root": root,
            "url": f"http://127.0.0.1:{server.server_address[1]}",
            "requested": requested,
            "keys": keys,
        }
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _rows(pattern: str) -> list[tuple]:
    return [
        (r["key"], r["caption"], r["image"]["bytes"] if "image" in r else list(r["image_embeds"]))
        for r in iter_shard_rows(expand_shards(pattern))
    ]


def test_shard_urls_give_the_same_rows_as_the_local_paths(served):
    """Brace and glob URLs list the same shards as the folder (as URLs); the tars' and Parquet files' rows, and the
    in-memory table of ``load_shard_captions`` (train.py without --streaming), equal the local ones; a missing
    shard URL fails naming it, a glob URL matching nothing too."""
    root, url = served["root"], served["url"]
    names = [f"{url}/tars/shard-{i:04d}.tar" for i in range(3)]
    assert expand_shards(f"{url}/{LOCAL}") == expand_shards(f"{url}/tars/*.tar") == names
    served["requested"].clear()
    remote = _rows(f"{url}/{LOCAL}")
    assert remote == _rows(str(root / LOCAL)) and [r[0] for r in remote] == served["keys"]
    assert {p for p in served["requested"] if p.endswith(".tar")} == {
        f"/tars/shard-{i:04d}.tar" for i in range(3)
    }
    assert _rows(f"{url}/emb/*.parquet") == _rows(str(root / "emb" / "*.parquet"))

    (remote_table, remote_report), (local_table, local_report) = (
        load_shard_captions(pattern) for pattern in (f"{url}/{LOCAL}", str(root / LOCAL))
    )
    assert (
        remote_table["image_id"] == local_table["image_id"]
        and remote_table["captions"] == local_table["captions"]
    )
    assert [i["bytes"] for i in remote_table["image"]] == [i["bytes"] for i in local_table["image"]]
    assert remote_report.num_captions == local_report.num_captions == 15

    with pytest.raises(ShardError, match=rf"{url}/tars/shard-0003\.tar"):
        list(iter_shard_rows([names[0], f"{url}/tars/shard-0003.tar"]))
    with pytest.raises(ShardError, match="no shard matches"):
        expand_shards(f"{url}/tars/nothing-*.tar")


def test_train_streams_shard_urls_like_the_local_folder(served, tmp_path):
    """train.py --streaming --train_file 'http://.../shard-{0000..0002}.tar' with 2 loader worker processes: the
    same keys in the same order, the same skipped sample (named by its URL) and the same weights as from the local
    folder."""
    from safetensors.torch import load_file

    preset = write_tiny_preset(
        tmp_path / "preset",
        {
            "learning_rate": 1e-2,
            "num_warmup_steps": 2,
            "max_caption_length": 24,
            "per_device_train_batch_size": 2,
        },
    )

    def run(pattern: str, out: Path) -> dict:
        return train.main(
            ["--config", str(preset), "--train_file", pattern, "--streaming", "--output_dir", str(out)]
            + ["--max_train_steps", "6", "--num_train_epochs", "1", "--dataloader_num_workers", "2"]
            + ["--on_bad_image", "skip", "--save_sample_order", "--report_to", "none"]
        )  # fmt: skip

    served["requested"].clear()
    remote = run(f"{served['url']}/{LOCAL}", tmp_path / "remote")
    assert {p for p in served["requested"] if p.endswith(".tar")} == {
        f"/tars/shard-{i:04d}.tar" for i in range(3)
    }
    local = run(str(served["root"] / LOCAL), tmp_path / "local")
    order = [
        (tmp_path / run_ / "sample_order" / "rank-0.txt").read_text().split() for run_ in ("remote", "local")
    ]
    assert order[0] == order[1] and len(order[0]) == 11  # 6 steps of 2, the broken sample skipped
    assert remote["completed_steps"] == local["completed_steps"] == 6
    assert [(s["key"], s["shard"]) for s in remote["skipped_samples"]] == [
        (BROKEN, f"{served['url']}/tars/shard-0001.tar")
    ]
    a, b = (
        load_file(tmp_path / "remote" / "model.safetensors"),
        load_file(tmp_path / "local" / "model.safetensors"),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_embed_reads_shard_urls_and_names_outputs_after_their_file_names(
    served, tmp_path, tiny_model, tiny_processor
):
    """``clipcap embed --data 'http://.../tars/*.tar'``: outputs named ``shard-000<i>.parquet``, identical to those
    written from the local folder."""
    from modeling_clipcap.embed import embed_shards

    for name, pattern in (("remote", f"{served['url']}/tars/*.tar"), ("local", str(served["root"] / LOCAL))):
        embed_shards(
            tiny_model, tiny_processor.image_processor, pattern, tmp_path / name, show_progress=False
        )
    for i in range(3):
        remote, local = (
            pq.read_table(tmp_path / name / f"shard-{i:04d}.parquet") for name in ("remote", "local")
        )
        assert remote.equals(local)
