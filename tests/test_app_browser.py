"""``clipcap app`` in a real headless browser: Debian's Chromium driven by selenium through the system
``chromedriver`` (never a browser that a tool downloads). Loads the page, uploads an image, reads its caption,
uploads a corrupt file and reads the error; keeps screenshots as test artifacts.

Needs ``apt-get install -y chromium chromium-driver``; without them this test fails (it does not skip).
Screenshots go to ``$CLIPCAP_TEST_ARTIFACTS`` (default ``outputs/test_artifacts/`` in the repository).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from modeling_clipcap.app import build_app, launch_app  # noqa: E402
from modeling_clipcap.image_io import load_image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CLIPCAP_TEST_ARTIFACTS", REPO_ROOT / "outputs" / "test_artifacts"))
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",  # the network is closed; background fetches only stall
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)


def system_browser() -> tuple[str, str]:
    """Paths of the system Chromium and chromedriver; fails (not skips) with the install command when absent."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, (
        "the browser test needs Debian's chromium and chromedriver on the PATH: "
        "apt-get install -y chromium chromium-driver"
    )
    return browser, driver


@pytest.fixture()
def browser(tmp_path):
    browser_path, driver_path = system_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def app_url(tmp_path):
    from conftest import build_tiny_processor, build_tiny_tokenizer, tiny_clipcap_config

    from modeling_clipcap import ClipCapForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(tiny_clipcap_config(len(tokenizer))).eval()
    model.generation_config.max_new_tokens = 6
    processor = build_tiny_processor(tokenizer)
    demo = build_app(model, processor)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch_app(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", model, processor
    finally:
        demo.close()


def upload_and_run(driver, path: Path) -> None:
    clear = driver.find_elements(By.CSS_SELECTOR, "#clipcap-images button[aria-label='Clear']")
    if clear:
        clear[0].click()
    file_input = WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#clipcap-images input[type=file]")
    )
    file_input.send_keys(str(path))
    # the file list shows the name as stem and suffix on separate lines
    WebDriverWait(driver, 30).until(lambda d: path.stem in d.find_element(By.ID, "clipcap-images").text)
    driver.find_element(By.ID, "clipcap-run").click()


def test_page_in_chromium_captions_an_upload_and_shows_the_error_of_a_corrupt_file(
    browser, app_url, real_photos, tmp_path
):
    url, model, processor = app_url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def expected(image: Path) -> str:
        inputs = processor(images=[load_image(image)], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(pixel_values=inputs["pixel_values"])
        return f"{image.name}: " + " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())

    def captions_value(driver) -> str:
        return driver.find_element(By.CSS_SELECTOR, "#clipcap-captions textarea").get_attribute("value")

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "clipcap-run"))
    # the frontend sets the title once it has loaded the app's config (later than the button in Gradio 6.0)
    WebDriverWait(browser, 30).until(lambda d: "ClipCap" in d.title)
    assert "ClipCap" in browser.title

    upload_and_run(browser, real_photos[0])
    WebDriverWait(browser, 60).until(lambda d: captions_value(d))
    assert captions_value(browser) == expected(real_photos[0])
    WebDriverWait(browser, 30).until(
        lambda d: "Captioned 1 of 1" in d.find_element(By.ID, "clipcap-status").text
    )
    assert expected(real_photos[0]).split(": ", 1)[1] in browser.find_element(By.ID, "clipcap-table").text
    browser.save_screenshot(str(ARTIFACTS / "app_caption.png"))

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_text("this is not a JPEG\n")
    upload_and_run(browser, corrupt)
    message = "cannot read image corrupt.jpg: it is not an image in a supported format"
    WebDriverWait(browser, 60).until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(ARTIFACTS / "app_error.png"))

    # the page still works after the error: another image gets its own caption
    upload_and_run(browser, real_photos[1])
    WebDriverWait(browser, 60).until(lambda d: captions_value(d) == expected(real_photos[1]))
    assert (ARTIFACTS / "app_caption.png").stat().st_size > 10_000
