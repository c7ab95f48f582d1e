"""The editor in a real browser (Chromium through playwright): the page works with its token, and a page of
another origin that posts to the editor the way a malicious site would changes nothing.

Skipped, with the reason, where no Chromium is installed (apt-get install chromium; pip install playwright)."""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")

from hspace.directions.direction import Direction  # noqa: E402
from hspace.engine import Engine  # noqa: E402
from hspace.ui.server import Editor, create_app  # noqa: E402

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The editor on 127.0.0.1 (uvicorn in a thread) and a page of another origin on another port."""
    import uvicorn

    engine = Engine.load("tiny-random")
    direction = Direction(torch.randn(STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(0)) * 3, meta={"name": "pc1", "method": "pca"}, spec=engine.spec)
    saved = tmp_path_factory.mktemp("saved")
    editor = Editor(engine, [direction], saved, steps=STEPS, eta=1.0)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(editor, "127.0.0.1", port), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    evil = tmp_path_factory.mktemp("evil")
    (evil / "index.html").write_text(f"""<script>
      const target = "http://127.0.0.1:{port}";
      const post = (path, type, body) => fetch(target + path, {{method: "POST", mode: "no-cors", headers: {{"Content-Type": type}}, body}})
        .then(() => "sent", (e) => "blocked: " + e);
      Promise.all([post("/api/save", "text/plain", JSON.stringify({{name: "evil", parts: [{{name: "pc1", scale: 1, window: null}}]}})),
                   post("/api/upload", "application/x-www-form-urlencoded", "x=1"),
                   fetch(target + "/api/info").then((r) => r.text(), (e) => "unreadable")])
        .then((r) => {{ document.title = "done"; window.results = r; }});
    </script>""")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(evil))  # noqa: E731
    other = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    yield editor, port, other.server_address[1]
    server.should_exit = True
    other.shutdown()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_the_page_works_with_its_token(served, browser):
    editor, port, _ = served
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector(".dir input[type=range]")
    page.wait_for_function("document.getElementById('edited').src.startsWith('data:image/png')")
    before = page.get_attribute("#edited", "src")
    page.eval_on_selector(".dir input[type=range]", "el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
    page.wait_for_function(f"document.getElementById('edited').src !== {before!r}", timeout=30_000)
    page.fill("#savename", "from the page")
    page.click("#save")
    page.wait_for_function("document.getElementById('status').textContent.includes('saved') || document.getElementById('error').textContent", timeout=30_000)
    assert page.text_content("#error") == "" and errors == []
    assert [p.name for p in editor.save_dir.iterdir()] == ["from_the_page.safetensors"]
    page.close()


def test_a_page_of_another_origin_changes_nothing_and_reads_nothing(served, browser):
    editor, port, evil_port = served
    before = sorted(p.name for p in editor.save_dir.iterdir())
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{evil_port}/index.html")
    page.wait_for_function("document.title === 'done'", timeout=30_000)
    results = page.evaluate("window.results")
    assert results[2] == "unreadable"  # no CORS: the other origin cannot read the editor's answers
    assert sorted(p.name for p in editor.save_dir.iterdir()) == before  # and what it sent did nothing
    page.close()


def test_a_slider_with_a_card_moves_in_effect_units_and_shows_what_the_card_measured(served, browser):
    editor, port, _ = served
    engine = editor.engine
    calibration = {"scale": 0.5, "unit": "50% flips of smile", "target": "smile", "scales": [-1.0, 0.0, 1.0],
                   "change": {"smile": [-0.4, 0.0, 0.4], "hat": [0.1, 0.0, 0.2], "glasses": [0.0, 0.0, -0.05]}, "flip": [0.5, None, 0.5]}
    smile = Direction(torch.randn(STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(1)),
                      meta={"name": "smile", "method": "regression", "calibration": calibration}, spec=engine.spec)
    name = editor.add_direction(smile)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector(".dir:nth-child(2) input[type=range]")
    assert "effect: 1 = 50% flips of smile" in page.text_content(".dir:nth-child(2) .unit")
    page.eval_on_selector(".dir:nth-child(2) input[type=range]", "el => { el.value = 2; el.dispatchEvent(new Event('input')); }")
    # effect scale 2 = raw 1.0: the card's last column, read without any request
    assert page.text_content(".dir:nth-child(2) .effect") == "measured: smile +0.40 (50% flip); side effects: hat +0.20, glasses -0.05"
    page.eval_on_selector(".dir:nth-child(2) input[type=range]", "el => { el.value = 1; el.dispatchEvent(new Event('input')); }")
    assert page.text_content(".dir:nth-child(2) .effect") == "measured: smile +0.20 (25% flip); side effects: hat +0.10, glasses -0.03"
    assert errors == []
    page.close()
    # the combination applies raw = effect x unit, and records both
    combination = editor.combination([{"name": name, "scale": 2.0, "window": None}])
    assert torch.allclose(combination.delta, 1.0 * smile.delta)
    assert combination.meta["params"]["parts"][0]["units"] == "effect" and combination.meta["params"]["parts"][0]["raw_scale"] == 1.0
