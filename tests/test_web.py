"""The server's page in a real headless Chromium (Debian's `chromium`, driven by Playwright),
with the demo model on 127.0.0.1. `.ci/run` installs the browser; without it (or without
the playwright package) the test skips and says why."""

import base64
import io
import json
import os
import shutil
import time

import pytest
from PIL import Image

CHROMIUM = os.environ.get("MLX_STARFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (pip install playwright)")
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does) "
        "or point MLX_STARFLOW_CHROMIUM at one",
        allow_module_level=True,
    )

from mlx_starflow import Pipeline  # noqa: E402
from mlx_starflow.cli.server import Server  # noqa: E402

TIMEOUT = 60_000  # ms, for any one wait in the browser


@pytest.fixture(scope="module")
def server():
    s = Server(Pipeline.from_pretrained("demo"), port=0, quiet=True).start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start;
        # the browser only ever opens this test's loopback page.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=TIMEOUT)
        yield b
        b.close()


def health(page, server) -> dict:
    return json.loads(page.request.get(server.url + "/health", timeout=TIMEOUT).text())


def test_the_page_generates_images_with_progress_and_downloads(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/", timeout=TIMEOUT)  # under the page's own CSP: no eval, nothing from elsewhere

    # the demo's twelve prompts are offered; one click fills the prompt
    page.wait_for_selector("#suggestions button", timeout=TIMEOUT)
    chips = page.locator("#suggestions button")
    assert chips.count() == 12
    chips.get_by_text("blue square", exact=True).click()
    assert page.input_value("#prompt") == "blue square"
    assert page.locator("#size option").all_inner_texts() == ["32x32"]
    assert page.get_attribute("#guidance", "placeholder") == "1"  # the model's own default
    page.fill("#seed", "7")
    page.fill("#n", "2")
    page.fill("#guidance", "1.5")

    # watch the stream's effects: the bar's values and the previews
    page.evaluate("""() => {
        window.seen = {bar: [], partial: 0};
        new MutationObserver(() => window.seen.bar.push(+document.getElementById('bar').getAttribute('aria-valuenow')))
            .observe(document.getElementById('bar'), {attributes: true});
        new MutationObserver((records) => { for (const r of records)
            if (r.target.className === 'partial') window.seen.partial += 1; })
            .observe(document.getElementById('grid'), {attributes: true, subtree: true, attributeFilter: ['class']});
    }""")
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('img.result').length === 2", timeout=TIMEOUT)
    seen = page.evaluate("window.seen")
    assert seen["partial"] == 2  # each image's preview after the deep block came first
    assert seen["bar"][-1] == 100 and len(set(seen["bar"])) > 5  # the bar moved with the tokens
    assert page.get_attribute("#bar", "aria-valuenow") == "100"
    assert page.inner_text("#status") == "Done: 2 images"

    cards = page.locator(".card")
    assert cards.count() == 2
    for i, seed in enumerate((7, 8)):
        card = cards.nth(i)
        img = card.locator("img.result")
        assert img.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]") == [True, 32, 32]
        assert f"seed {seed}" in card.inner_text() and "guidance 1.5" in card.inner_text()
        link = card.locator("a")
        assert link.get_attribute("download") == f"starflow-{seed}.png"
        href = link.get_attribute("href")
        assert href == img.get_attribute("src") and href.startswith("data:image/png;base64,")
        # the very PNG the server wrote, with its parameters
        im = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
        params = json.loads(im.text["parameters"])
        assert im.size == (32, 32) and params["seed"] == seed and params["prompt"] == "blue square"
        assert params["guidance"] == 1.5

    shot = tmp_path / "server-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of the page: {shot}")
    assert shot.stat().st_size > 10_000
    assert not problems, problems
    page.close()


def test_cancel_on_the_page_stops_the_generation(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/", timeout=TIMEOUT)
    page.wait_for_selector("#suggestions button", timeout=TIMEOUT)
    before = health(page, server)
    page.fill("#n", "4")
    page.click("#generate")
    page.wait_for_function("() => +document.getElementById('bar').getAttribute('aria-valuenow') >= 10", timeout=TIMEOUT)
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Cancelled'", timeout=TIMEOUT)
    deadline = time.monotonic() + 10
    while (h := health(page, server))["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["running"] == 0 and h["cancelled"] == before["cancelled"] + 1
    assert h["completed"] == before["completed"]
    assert page.locator(".card").count() == 0
    page.close()
