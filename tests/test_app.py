"""``clipcap app``: the Gradio page and the batched ``caption`` endpoint, served on 127.0.0.1 and called with
the real ``gradio_client``; decoding choices, CLIPScore re-ranking, downloads, the command line, the Space."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# No skip when Gradio is missing: the app is part of the package, so its tests fail until the app extra is installed.
import gradio as gr  # noqa: E402  (needs: pip install -e ".[app]")
from gradio_client import Client, handle_file  # noqa: E402

from modeling_clipcap.app import (  # noqa: E402
    AppInputError,
    Decoding,
    build_app,
    caption_files,
    cli_main,
    format_prefix_tokens,
    launch_app,
    resolve_model_path,
    write_downloads,
)
from modeling_clipcap.image_io import load_image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 2_000_000  # the server's bomb limit in these tests: the real images have at most 1.7 M pixels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, real_photos) -> Path:
    """A tiny model taught a different caption for each test photo (greedy and beam search), so the tests that
    compare the app's captions with model.generate's one image at a time would see rows given the wrong image."""
    from conftest import build_tiny_processor, build_tiny_tokenizer, tiny_clipcap_config
    from test_families import teach_distinct_captions

    from modeling_clipcap import ClipCapForConditionalGeneration

    out = tmp_path_factory.mktemp("app") / "model"
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer)))
    photos = processor(images=[load_image(p) for p in real_photos], return_tensors="pt")
    teach_distinct_captions(model, tokenizer, dict(photos), beams=(1, 2, 3), max_new_tokens=6)
    model.generation_config.max_new_tokens = 6
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_text("this is not a JPEG\n")
    huge = folder / "huge.png"
    Image.new("L", (1500, 1400)).save(huge)  # 2.1 M pixels > MAX_PIXELS
    return {"corrupt": corrupt, "huge": huge}


def expected_captions(model, processor, paths, **generate_kwargs) -> list[str]:
    """What model.generate writes for these files, one image at a time."""
    out = []
    for path in paths:
        inputs = processor(images=[load_image(path)], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(pixel_values=inputs["pixel_values"], **generate_kwargs)
        out.append(" ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split()))
    return out


class GenerateCounter:
    """Wraps model.generate to record the batch size and keyword arguments of every call."""

    def __init__(self, model):
        self.sizes: list[int] = []
        self.kwargs: list[dict] = []
        self.threads: list[str] = []
        self._generate = model.generate
        self._lock = threading.Lock()
        model.generate = self

    def __call__(self, *args, **kwargs):
        pixel_values = kwargs.get("pixel_values")
        with self._lock:
            self.sizes.append(0 if pixel_values is None else int(pixel_values.shape[0]))
            self.kwargs.append({k: v for k, v in kwargs.items() if k != "pixel_values"})
            self.threads.append(threading.current_thread().name)
        return self._generate(*args, **kwargs)


@pytest.fixture(scope="module")
def server(saved_model):
    """The app on 127.0.0.1:free port, as `clipcap app` launches it (show_error=True), with a generate counter."""
    from modeling_clipcap.captioning import load_captioner

    model, processor = load_captioner(saved_model)
    counter = GenerateCounter(model)
    demo = build_app(model, processor, max_batch_size=8, queue_size=32, max_pixels=MAX_PIXELS)
    port = free_port()
    launch_app(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield {"url": url, "model": model, "processor": processor, "counter": counter, "demo": demo}
    finally:
        demo.close()


def page_is_up(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status == 200 and b"ClipCap" in response.read()


def test_caption_endpoint_gives_the_text_of_model_generate(server, real_photos):
    client = Client(server["url"], verbose=False)
    expected = expected_captions(server["model"], server["processor"], real_photos[:2])
    assert expected[0] != expected[1]  # different captions: an answer for the wrong image would fail
    got = [client.predict(handle_file(str(p)), api_name="/caption") for p in real_photos[:2]]
    assert got == expected
    assert all(isinstance(text, str) and text for text in got)


@pytest.mark.parametrize(
    "which, message",
    [
        ("corrupt", "cannot read image corrupt.jpg: it is not an image in a supported format"),
        ("huge", "more than the limit of 2,000,000 (decompression-bomb protection)"),
    ],
)
def test_caption_endpoint_bad_file_error_reaches_the_client(server, bad_files, real_photos, which, message):
    from gradio_client.exceptions import ValidationError

    client = Client(server["url"], verbose=False)
    with pytest.raises(ValidationError, match=r"(?s)" + message.replace("(", r"\(").replace(")", r"\)")):
        client.predict(handle_file(str(bad_files[which])), api_name="/caption")
    # still serving
    assert client.predict(handle_file(str(real_photos[0])), api_name="/caption")
    assert page_is_up(server["url"])


def test_caption_endpoint_empty_request_is_refused_with_a_message(server):
    from gradio_client.exceptions import ValidationError

    client = Client(server["url"], verbose=False)
    with pytest.raises(ValidationError, match="no image was sent"):
        client.predict(None, api_name="/caption")


def test_eight_concurrent_requests_are_batched_and_a_bad_one_fails_alone(server, real_photos, bad_files):
    from gradio_client.exceptions import ValidationError

    images = [real_photos[i % len(real_photos)] for i in range(8)]
    expected = expected_captions(server["model"], server["processor"], images)
    assert len(set(expected)) == len(real_photos)  # one caption per photo: a mixed-up batch would fail
    counter = server["counter"]
    client = Client(server["url"], verbose=False)
    for round_ in range(2):
        before = len(counter.sizes)
        jobs = [client.submit(handle_file(str(p)), api_name="/caption") for p in images]
        if round_ == 1:  # a corrupt file among the concurrent requests: refused alone, the others answer
            bad = client.submit(handle_file(str(bad_files["corrupt"])), api_name="/caption")
        assert [job.result(timeout=120) for job in jobs] == expected
        sizes = counter.sizes[before:]
        assert sum(sizes) == 8 and max(sizes) > 1, (
            f"8 requests were not batched: generate batch sizes {sizes}"
        )
        assert max(sizes) <= 8
    with pytest.raises(ValidationError, match="corrupt.jpg"):
        bad.result(timeout=60)
    assert page_is_up(server["url"])


def test_every_model_call_runs_on_the_one_model_thread(server, real_photos):
    """Gradio hands events to any thread of its pool; the model's work must stay on one thread (one malloc
    arena: the server's memory stays flat under load, docs/performance.md "App soak")."""
    counter = server["counter"]
    client = Client(server["url"], verbose=False)
    before = len(counter.threads)
    jobs = [client.submit(handle_file(str(p)), api_name="/caption") for p in real_photos * 2]
    [job.result(timeout=120) for job in jobs]
    client.predict([handle_file(str(real_photos[0]))], "greedy", 2, 1.0, 1.0, 1, 6, api_name="/caption_page")
    threads = set(counter.threads[before:])
    assert len(threads) == 1 and threads.pop().startswith("clipcap-model"), counter.threads[before:]


def test_caption_endpoint_over_plain_http(server, real_photos):
    """The documented curl recipe: upload, POST /gradio_api/call/caption, read the event stream."""
    import httpx

    base = server["url"].rstrip("/") + "/gradio_api"
    with open(real_photos[0], "rb") as f:
        uploaded = httpx.post(f"{base}/upload", files={"files": (real_photos[0].name, f)}, timeout=30).json()
    body = {"data": [{"path": uploaded[0], "meta": {"_type": "gradio.FileData"}}]}
    event_id = httpx.post(f"{base}/call/caption", json=body, timeout=30).json()["event_id"]
    stream = httpx.get(f"{base}/call/caption/{event_id}", timeout=60).text
    data_lines = [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data: ")]
    assert json.loads(data_lines[-1]) == expected_captions(
        server["model"], server["processor"], real_photos[:1]
    )


def test_page_endpoint_beam_search_prefix_tokens_and_downloads(server, real_photos, bad_files, tmp_path):
    client = Client(server["url"], verbose=False)
    model, processor = server["model"], server["processor"]
    files = [handle_file(str(p)) for p in real_photos[:2]] + [handle_file(str(bad_files["corrupt"]))]
    gallery, text, table, downloads, status = client.predict(
        files, "beam search", 3, 1.0, 1.0, 2, 5, api_name="/caption_page"
    )
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5, "do_sample": False}
    rows = table["data"]
    assert table["headers"] == [
        "image",
        "rank",
        "caption",
        "prefix: nearest tokens",
    ]  # no CLIP-S without CLIP
    assert [r[0] for r in rows] == [real_photos[0].name] * 2 + [real_photos[1].name] * 2 + ["corrupt.jpg"]
    # the two photos' best captions differ: rows of the wrong photo would fail
    assert rows[0][2] != rows[2][2]
    for i, path in enumerate(real_photos[:2]):
        inputs = processor(images=[load_image(path)], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(pixel_values=inputs["pixel_values"], **kwargs)
        beams = [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]
        assert [rows[2 * i][2], rows[2 * i + 1][2]] == beams
        assert [rows[2 * i][1], rows[2 * i + 1][1]] == [1, 2]
        tokens = model.interpret_prefix(pixel_values=inputs["pixel_values"], tokenizer=processor.tokenizer)[0]
        assert len(tokens) == model.config.prefix_length
        assert rows[2 * i][3] == format_prefix_tokens(tokens) and rows[2 * i + 1][3] == ""
        assert text.splitlines()[i] == f"{path.name}: {beams[0]}"
    assert rows[4][2].startswith("error: cannot read image corrupt.jpg")
    assert "Captioned 2 of 3 image(s)" in status and "1 file(s) could not be read" in status
    assert len(gallery) == 2
    json_file = next(Path(p) for p in downloads if p.endswith(".json"))
    csv_file = next(Path(p) for p in downloads if p.endswith(".csv"))
    saved = json.loads(json_file.read_text())
    assert saved["decoding"]["mode"] == "beam search" and saved["decoding"]["num_beams"] == 3
    assert [r["image"] for r in saved["results"]] == [
        real_photos[0].name,
        real_photos[1].name,
        "corrupt.jpg",
    ]
    assert saved["results"][0]["captions"][0]["caption"] == rows[0][2]
    assert saved["results"][2]["error"].startswith("cannot read image corrupt.jpg")
    csv_rows = list(csv.DictReader(io.StringIO(csv_file.read_text())))
    assert [r["caption"] for r in csv_rows[:4]] == [r[2] for r in rows[:4]]
    assert csv_rows[4]["error"].startswith("cannot read image corrupt.jpg")


@pytest.mark.parametrize(
    "files, decoding, message",
    [
        ([], ("greedy", 5, 1.0, 1.0, 1, 6), "No image to caption"),
        (["corrupt"], ("greedy", 5, 1.0, 1.0, 1, 6), "cannot read image corrupt.jpg"),
        (["image"], ("greedy", 5, 1.0, 1.0, 3, 6), "Greedy decoding writes one caption per image"),
        (["image"], ("beam search", 2, 1.0, 1.0, 3, 6), "raise Beams to 3 or more"),
    ],
)
def test_page_endpoint_errors_reach_the_client(server, real_photos, bad_files, files, decoding, message):
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)
    uploads = [handle_file(str(real_photos[0] if f == "image" else bad_files[f])) for f in files]
    with pytest.raises(AppError, match=message):
        client.predict(uploads, *decoding, api_name="/caption_page")
    assert page_is_up(server["url"])


def test_page_sampling_passes_temperature_top_p_and_caption_count(server, real_photos):
    client = Client(server["url"], verbose=False)
    _, _, table, _, status = client.predict(
        [handle_file(str(real_photos[0]))], "sampling", 1, 1.5, 0.35, 3, 4, api_name="/caption_page"
    )
    assert "sampling, temperature 1.5, top-p 0.35, 3 captions per image, at most 4 tokens" in status
    assert [row[1] for row in table["data"]] == [1, 2, 3]
    assert server["counter"].kwargs[-1] == {
        "max_new_tokens": 4,
        "num_return_sequences": 3,
        "do_sample": True,
        "num_beams": 1,
        "temperature": 1.5,
        "top_p": 0.35,
    }


def test_decoding_defaults_follow_the_generation_config():
    from transformers import GenerationConfig

    assert Decoding.from_generation_config(GenerationConfig(num_beams=4, max_new_tokens=12)) == Decoding(
        mode="beam search", num_beams=4, num_captions=1, max_new_tokens=12
    )
    sampled = Decoding.from_generation_config(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9))
    assert (sampled.mode, sampled.temperature, sampled.top_p) == ("sampling", 0.7, 0.9)
    assert Decoding.from_generation_config(GenerationConfig()).mode == "greedy"
    assert Decoding("greedy", max_new_tokens=9).generate_kwargs() == {
        "max_new_tokens": 9,
        "num_return_sequences": 1,
        "do_sample": False,
        "num_beams": 1,
    }
    with pytest.raises(AppInputError, match="Top-p must be in"):
        Decoding("sampling", top_p=0).generate_kwargs()
    with pytest.raises(AppInputError, match="Decoding must be one of"):
        Decoding("nucleus").generate_kwargs()


def test_page_captions_through_the_library_captioning_path(saved_model, real_photos, monkeypatch):
    """The app's captions come from ``captioning.caption_items`` (the library's one captioning path): one
    ``generate`` call per batch of uploads, the processor run once per image (the prefix tokens are read from the
    same inputs), the captions those of ``model.generate``."""
    import modeling_clipcap.app as app_module
    from modeling_clipcap.captioning import caption_items, load_captioner

    model, processor = load_captioner(saved_model)
    path_calls: list[int] = []

    def recording(*args, **kwargs):
        path_calls.append(1)
        return caption_items(*args, **kwargs)

    processed: list[int] = []  # images per processor call
    process = type(processor).__call__

    def counting(self, images=None, **kwargs):
        processed.append(len(images))
        return process(self, images=images, **kwargs)

    monkeypatch.setattr(app_module, "caption_items", recording)
    monkeypatch.setattr(type(processor), "__call__", counting)
    counter = GenerateCounter(model)
    decoding = Decoding(mode="beam search", num_beams=2, num_captions=2, max_new_tokens=4)
    results = caption_files(model, processor, real_photos[:3], decoding, batch_size=2)
    assert path_calls == [1] and counter.sizes == [2, 1] and processed == [2, 1]
    # a different caption per photo: a batch mix-up would fail
    assert len({r["captions"][0]["caption"] for r in results}) == 3
    monkeypatch.undo()
    for path, result in zip(real_photos[:3], results):
        inputs = processor(images=[load_image(path)], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, num_beams=2, num_return_sequences=2, max_new_tokens=4)
            tokens = model.interpret_prefix(**inputs, tokenizer=processor.tokenizer)[0]
        beams = [" ".join(text.split()) for text in processor.batch_decode(ids)]
        assert [c["caption"] for c in result["captions"]] == beams
        assert result["prefix_tokens"] == tokens and len(tokens) == model.config.prefix_length


def test_clip_model_scores_and_reranks_captions(saved_model, real_photos, tmp_path):
    """--clip_model: every caption gets its CLIP-S (the library's compute_clip_score) and they come best first."""
    from conftest import build_tiny_processor, build_tiny_tokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from modeling_clipcap.captioning import load_captioner
    from modeling_clipcap.clip_score import compute_clip_score, load_clip

    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": len(tokenizer) - 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    clip_dir = tmp_path / "clip"
    CLIPModel(config).save_pretrained(clip_dir)
    CLIPProcessor(
        image_processor=build_tiny_processor(tokenizer).image_processor, tokenizer=tokenizer
    ).save_pretrained(clip_dir)
    model, processor = load_captioner(saved_model)
    clip = load_clip(clip_dir)
    decoding = Decoding("beam search", num_beams=4, num_captions=4, max_new_tokens=5)
    results = caption_files(model, processor, real_photos[:2], decoding, clip=clip)
    plain = caption_files(model, processor, real_photos[:2], decoding)
    assert plain[0]["captions"][0]["caption"] != plain[1]["captions"][0]["caption"]  # photos told apart
    for scored, unscored, path in zip(results, plain, real_photos):
        scores = [c["clip_score"] for c in scored["captions"]]
        assert scores == sorted(scores, reverse=True) and all(s is not None for s in scores)
        assert sorted(c["caption"] for c in scored["captions"]) == sorted(
            c["caption"] for c in unscored["captions"]
        )
        reference = compute_clip_score(
            clip[0],
            clip[1],
            [load_image(path)] * 4,
            [c["caption"] for c in scored["captions"]],
            per_image=True,
        )["CLIP-S_per_image"]
        assert scores == pytest.approx(reference, abs=1e-5)
    # build_app(..., clip_model=DIR) loads it and the page shows CLIP-S
    demo = build_app(str(saved_model), clip_model=str(clip_dir))
    assert "CLIPScore" in json.dumps(demo.config)
    json_path, csv_path = write_downloads(results, decoding, tmp_path / "out")
    saved = json.loads(json_path.read_text())["results"]
    assert [c["clip_score"] for c in saved[1]["captions"]] == scores
    csv_scores = [
        float(row["clip_score"]) for row in csv.DictReader(open(csv_path)) if row["image"] == path.name
    ]
    assert csv_scores == pytest.approx(scores, abs=1e-4)


def test_resolve_model_path_errors(tmp_path, monkeypatch):
    assert resolve_model_path(tmp_path) == tmp_path
    with pytest.raises(AppInputError, match=r"--model .*no_such_dir: no such folder"):
        resolve_model_path(tmp_path / "no_such_dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AppInputError, match="downloading it from the Hugging Face Hub failed"):
        resolve_model_path("someone/no-such-model")


def test_cli_bad_model_and_examples_exit_2(saved_model, tmp_path, capsys):
    from modeling_clipcap.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["app", "--model", str(tmp_path / "missing")])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.share is False
    assert cli_main(args) == 2
    assert "no such folder" in capsys.readouterr().err
    args = parser.parse_args(["app", "--model", str(saved_model), "--examples", str(tmp_path / "nothing")])
    assert cli_main(args) == 2
    assert "--examples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["app", "--model", str(saved_model), "--share", "maybe"])


@pytest.mark.slow  # a fresh interpreter imports Gradio and loads the model: about 15 s on 2 busy cores
def test_cli_serves_on_the_given_host_and_port_with_examples(saved_model, real_photos, tmp_path):
    """`clipcap app --host --port --examples` in a subprocess: the page answers there and lists the examples."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "modeling_clipcap.cli",
        "app",
        "--model",
        str(saved_model),
        "--host",
        "127.0.0.1",
    ]
    cmd += ["--port", str(port), "--examples", str(real_photos[0]), str(real_photos[1])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if page_is_up(url):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the app did not come up within 120 s"
            time.sleep(0.5)
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            config = response.read().decode()
        assert f"ClipCap captioning: {saved_model.parent.name}/{saved_model.name}" in config
        assert real_photos[0].name in config and real_photos[1].name in config
        client = Client(url, verbose=False)
        assert client.predict(handle_file(str(real_photos[0])), api_name="/caption")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_space_app_builds_the_same_app_on_a_model_id(saved_model, monkeypatch):
    """hub_configs/space/app.py runs build_app on CLIPCAP_MODEL; its README carries the Space front matter."""
    import runpy

    space = REPO_ROOT / "hub_configs" / "space"
    monkeypatch.setenv("CLIPCAP_MODEL", str(saved_model))
    namespace = runpy.run_path(str(space / "app.py"), run_name="space_app")  # not "__main__": no launch
    assert isinstance(namespace["demo"], gr.Blocks)
    assert namespace["demo"].title == f"ClipCap captioning: {saved_model.parent.name}/{saved_model.name}"
    front = (space / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front and "sdk_version:" in front
    # requirements.txt installs the wheel that `pip wheel --no-deps . -w hub_configs/space` writes for this version
    import tomllib

    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    lines = [
        line for line in (space / "requirements.txt").read_text().splitlines() if not line.startswith("#")
    ]
    assert f"./modeling_clipcap-{version}-py3-none-any.whl[app]" in lines


def test_page_download_folder_is_removed_with_its_page():
    """Each page keeps its JSON/CSV downloads in a temporary folder; it goes when the page's handler goes (and at
    exit), instead of piling up in the temp dir."""
    import gc

    from modeling_clipcap import app

    handler = app._page_handler(gr, None, None, None, None, [])
    root = handler.output_root
    (root / "1").mkdir()
    (root / "1" / "captions.json").write_text("[]")
    assert root.is_dir()
    del handler
    gc.collect()
    assert not root.exists()
