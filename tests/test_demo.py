"""`resnet demo`: the Gradio app on loopback answers `/predict` through gradio_client, and a
headless Chromium (Debian's package, driven by Playwright) shows the top-5 bars after a click
on an example."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import deliver_helper as dh
from deliver_helper import exported, run  # noqa: F401 (fixtures)

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# One worker serves the module's demo (pytest-xdist would start one per worker otherwise).
pytestmark = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def served(run, exported):
    """The demo of an exported folder, served on 127.0.0.1 while the module's tests run."""
    pytest.importorskip("gradio")
    from resnet.deliver.demo import launch
    from trainutil import free_port

    app, url = launch(str(exported), port=free_port(), block=False)
    yield run, url
    app.close()


def test_predict_route_returns_five_confidences(served):
    from gradio_client import Client, handle_file

    run, url = served
    path, label = dh.class_images(run.parent / "images")[2]
    result = Client(url, verbose=False).predict(handle_file(str(path)), api_name="/predict")
    assert result["label"] == f"class {label}"
    confidences = [c["confidence"] for c in result["confidences"]]
    assert len(confidences) == 5 and sum(confidences) == pytest.approx(1.0, abs=0.05)


def _submit_until_labelled(page, tries: int = 6) -> None:
    """Click Submit until the five bars show: a click before the example has reached the image
    input sends no image (and gets an empty label), so one click is not enough on a busy CPU."""
    bars = page.locator("[data-testid$='-confidence-set']").nth(4)
    for _ in range(tries):
        page.get_by_role("button", name="Submit").click()
        try:
            return bars.wait_for(timeout=10_000)
        except Exception:  # playwright's TimeoutError: try again
            continue
    bars.wait_for(timeout=1)  # raises with playwright's own message


def test_a_browser_shows_the_label_bars(served, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium package (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    _, url = served
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, timeout=60_000)
            page.get_by_text("trained on").first.wait_for(timeout=60_000)  # the card's headline
            page.locator(".gallery-item, [data-testid='examples'] button, table.examples-table "
                         "tr, .example").first.click(timeout=30_000)
            _submit_until_labelled(page)
            top = page.locator("[data-testid='label-output-value']").inner_text()
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert top.startswith("class ") and shot.stat().st_size > 10_000
    if os.environ.get("RESNET_DEMO_SCREENSHOT"):  # to refresh docs/demo.png
        shutil.copyfile(shot, os.environ["RESNET_DEMO_SCREENSHOT"])


def test_the_space_app_classifies_with_timm_alone(run, exported):
    """space/app.py (what a Hugging Face Space runs) loads the folder through timm and agrees
    with `resnet predict` on known images."""
    import importlib.util

    pytest.importorskip("timm")
    from PIL import Image

    spec = importlib.util.spec_from_file_location("space_app", exported / "space" / "app.py")
    space = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(space)
    classify, model = space.timm_classifier(space._default_model(exported / "space"))
    assert model.pretrained_cfg["label_names"][0] == "class 0"
    for path, label in dh.class_images(run.parent / "images"):
        top = classify(Image.open(path))
        assert len(top) == 5 and max(top, key=top.get) == f"class {label}"
    headline = space.headline("resnet18", dh.CLASSES, space.read_card_headline(exported))
    assert "val top-1 75.0%" in headline
