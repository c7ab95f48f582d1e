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


def _serve(editor):
    """The editor's app served by uvicorn on 127.0.0.1 in a thread: (server, port)."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(editor, "127.0.0.1", port), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The editor on 127.0.0.1 (uvicorn in a thread) and a page of another origin on another port."""

    engine = Engine.load("tiny-random")
    direction = Direction(torch.randn(STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(0)) * 3, meta={"name": "pc1", "method": "pca"}, spec=engine.spec)
    other = Direction(torch.randn(STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(5)) * 3, meta={"name": "pc2", "method": "pca"}, spec=engine.spec)
    saved = tmp_path_factory.mktemp("saved")
    editor = Editor(engine, [direction, other], saved, steps=STEPS, eta=1.0)
    server, port = _serve(editor)

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
    page.wait_for_function("document.getElementById('savemsg').textContent.includes('saved') || document.getElementById('error').textContent", timeout=30_000)
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
    page.wait_for_selector(f'.dir[data-name="{name}"] input.scale')
    assert "effect: 1 = 50% flips of smile" in page.text_content(f'.dir[data-name="{name}"] .unit')
    page.eval_on_selector(f'.dir[data-name="{name}"] input.scale', "el => { el.value = 2; el.dispatchEvent(new Event('input')); }")
    # effect scale 2 = raw 1.0: the card's last column, read without any request
    assert page.text_content(f'.dir[data-name="{name}"] .effect') == "measured: smile +0.40 (50% flip); side effects: hat +0.20, glasses -0.05"
    page.eval_on_selector(f'.dir[data-name="{name}"] input.scale', "el => { el.value = 1; el.dispatchEvent(new Event('input')); }")
    assert page.text_content(f'.dir[data-name="{name}"] .effect') == "measured: smile +0.20 (25% flip); side effects: hat +0.10, glasses -0.03"
    assert errors == []
    page.close()
    # the combination applies raw = effect x unit, and records both
    combination = editor.combination([{"name": name, "scale": 2.0, "window": None}])
    assert torch.allclose(combination.delta, 1.0 * smile.delta)
    assert combination.meta["params"]["parts"][0]["units"] == "effect" and combination.meta["params"]["parts"][0]["raw_scale"] == 1.0


def test_the_card_button_measures_a_card_and_the_slider_keeps_its_image_in_effect_units(served, browser):
    from test_ui import _brightness

    editor, port, _ = served
    engine = editor.engine
    strong = Direction(torch.randn(STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(3)) * 400,
                       meta={"name": "brighten", "method": "pca"}, spec=engine.spec)
    name = editor.add_direction(strong)
    editor.scorer = _brightness  # as `hspace ui --scorer ...` would give it
    try:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/")
        row = f'.dir[data-name="{name}"]'
        page.wait_for_selector(f"{row} button.card:not([hidden])")
        assert "no card yet" in page.text_content(f"{row} .effect")
        page.eval_on_selector(f"{row} input.scale", "el => { el.value = 1; el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }")
        page.click(f"{row} button.card")
        page.wait_for_function(f"document.querySelector('{row} .unit').textContent.includes('effect')", timeout=120_000)
        unit = editor.directions[name].meta["calibration"]["scale"]
        # the same raw scale as before the card: 1 raw = 1 / unit effect units (the range's step is 0.02), and the line reads the card
        assert float(page.input_value(f"{row} input.scale")) == pytest.approx(1 / unit, abs=0.02)
        assert page.text_content(f"{row} .effect").startswith("measured: bright")
        assert page.is_hidden(f"{row} button.card") and errors == []
        page.close()
    finally:  # the fixture's editor as it was for the other tests (one more slider moves the page's layout)
        editor.scorer = None
        editor.directions.pop(name, None)


SETTLED = "window.hspace.finalVersion === window.hspace.version && !document.getElementById('edited').classList.contains('stale')"


def _settle(page):
    page.wait_for_function(SETTLED, timeout=60_000, polling=50)


def _api_final(page) -> str:
    """The exact image of the page's current state, asked of the API directly."""
    return page.evaluate("""() => api('/api/edit', JSON.stringify({tab: 'check', seq: 0, quality: 'final', sample: sample(),
        parts: parts(), asyrp: document.getElementById('asyrp').checked, strip: []})).then((d) => d.edited)""")


def test_every_feature_through_the_page(served, browser, tmp_path):
    """As a user would, with the mouse and the keyboard: sliders, a window, Asyrp, a strip, an upload, a Jacobian
    direction of a painted region, save and load back, a reload that restores the state, a rapid drag that ends
    on the exact image of where it stopped, and bad input shown in the page."""
    from PIL import Image

    editor, port, _ = served
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector(".dir input.scale")
    _settle(page)
    original = page.get_attribute("#edited", "src")
    assert original == page.get_attribute("#original", "src")  # every slider at 0: the sample itself

    # a slider, moved with the mouse: the image changes, and is the exact edit of the slider's position
    slider = page.locator('.dir[data-name="pc1"] input.scale')
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.85, box["y"] + box["height"] / 2)
    _settle(page)
    moved = page.get_attribute("#edited", "src")
    assert moved != original, "moving a slider did not change the image"
    assert moved == _api_final(page) and page.text_content("#badge") == "exact"
    assert float(page.input_value('.dir[data-name="pc1"] input.scale')) > 1

    # the window: its start handle one step later, with the keyboard
    page.focus('.dir[data-name="pc1"] input.from')
    page.keyboard.press("ArrowRight")
    _settle(page)
    label = page.text_content('.dir[data-name="pc1"] .wlabel')
    assert f"t {editor.timesteps[1]} (step 1) to t {editor.timesteps[-1]} (step {STEPS - 1})" in label
    assert page.evaluate("parts()")[0]["window"] == [editor.timesteps[1], editor.timesteps[-1]]
    windowed = page.get_attribute("#edited", "src")
    assert windowed != moved and windowed == _api_final(page)

    # Asyrp and a strip of two seeds
    page.check("#asyrp")
    _settle(page)
    assert page.get_attribute("#edited", "src") != windowed
    page.fill("#strip", "5,6")
    page.press("#strip", "Enter")
    page.locator("#strip").blur()
    _settle(page)
    assert page.locator("#stripview figure").count() == 2

    # save the combination, see it listed, load it back as a slider
    page.fill("#savename", "my combination")
    page.click("#save")
    page.wait_for_function("document.getElementById('savemsg').textContent.startsWith('saved')")
    assert page.text_content("#savemsg") == "saved my_combination.safetensors"
    page.wait_for_function("document.querySelector('#saved li span').textContent.startsWith('my_combination.safetensors')")
    page.click("#saved li:first-child button.load")
    page.wait_for_selector('.dir[data-name="saved: my combination"]')

    # the state lives in the address: a reload restores it and shows the same image
    before = page.get_attribute("#edited", "src")
    page.reload()
    page.wait_for_selector(".dir input.scale")
    _settle(page)
    assert page.is_checked("#asyrp") and page.input_value("#strip") == "5,6"
    assert page.get_attribute("#edited", "src") == before
    page.uncheck("#asyrp")
    _settle(page)

    # a rapid drag: the image shown at the end is the exact edit of where the slider stopped
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.85, y)
    page.mouse.down()
    for i in range(30):
        page.mouse.move(box["x"] + box["width"] * (0.85 - 0.02 * i), y)
    page.mouse.up()
    _settle(page)
    assert abs(float(page.input_value('.dir[data-name="pc1"] input.scale')) - 4 * (2 * 0.27 - 1)) < 0.3
    assert page.get_attribute("#edited", "src") == _api_final(page)

    # a Jacobian direction of a painted region: the button is disabled while it computes; the new slider is named
    canvas = page.locator("#paint").bounding_box()
    page.mouse.move(canvas["x"] + 40, canvas["y"] + 40)
    page.mouse.down()
    page.mouse.move(canvas["x"] + 120, canvas["y"] + 90, steps=8)
    page.mouse.up()
    assert page.input_value("#jpart") == "__painted"
    page.select_option("#jt", str(STEPS - 1))
    page.evaluate("""() => { window.__disabled = false; const b = document.getElementById('jacobian');
        new MutationObserver(() => { if (b.disabled) window.__disabled = true; }).observe(b, {attributes: true}); }""")
    page.click("#jacobian")
    page.wait_for_function("document.getElementById('jmsg').textContent.startsWith('added')", timeout=60_000)
    name = f"jacobian painted t={editor.timesteps[-1]} #1"
    assert page.locator(f'.dir[data-name="{name}"]').count() == 1 and not page.is_disabled("#jacobian")
    assert page.evaluate("window.__disabled")  # it was disabled while computing

    # a slider removed is gone from the page and from the combination
    page.click('.dir[data-name="pc2"] button.remove')
    assert page.locator('.dir[data-name="pc2"]').count() == 0 and page.is_visible("#restore")

    # an uploaded image, inverted: with every slider at 0 the page shows the image itself
    page.click("#reset")
    _settle(page)
    picture = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    picture.save(tmp_path / "face.png")
    page.select_option("#kind", "upload")
    page.set_input_files("#file", str(tmp_path / "face.png"))
    page.wait_for_function("document.getElementById('status').textContent.includes('applied')", timeout=60_000)
    _settle(page)
    assert page.get_attribute("#edited", "src") == page.get_attribute("#original", "src") != original

    # bad input is shown in the page, and what was there is kept
    page.select_option("#kind", "seed")
    page.fill("#sample", "")
    page.locator("#sample").dispatch_event("change")
    page.wait_for_function("document.getElementById('error').textContent.includes('not valid')")
    page.fill("#jk", "0")
    page.click("#jacobian")
    assert "k \"0\" is not valid" in page.text_content("#jmsg")
    assert errors == []
    page.close()


def test_on_toysd_the_prompt_draws_the_sample_and_a_prompt_pair_slider_is_made_in_the_page(browser, tmp_path):
    """The text-to-image editor: the prompt field redraws the sample under the prompt typed, a prompt-pair slider made
    in the page is the direction prompt_direction computes, and moving it shows the exact edit of the prompt's sample."""
    from hspace.directions.prompts import prompt_direction
    from hspace.ui.editor import PAIR_FIRST_SEED

    engine = Engine.load("toysd", guidance=5.0)
    editor = Editor(engine, [], tmp_path / "saved", steps=6, eta=0.0)
    server, port = _serve(editor)
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#prompt", state="visible")
        _settle(page)
        empty = page.get_attribute("#original", "src")
        page.fill("#prompt", "a face, with a hat")
        page.press("#prompt", "Enter")
        page.locator("#prompt").blur()
        page.wait_for_function(f"document.getElementById('original').src !== {empty!r}", timeout=60_000)
        _settle(page)
        hat = editor.edit({"sample": {"seed": 0, "prompt": "a face, with a hat"}, "parts": []})["original"]
        assert page.get_attribute("#original", "src") == hat

        page.fill("#plus", "a face, smiling")
        page.fill("#minus", "a face, neutral")
        page.fill("#pairn", "4")
        page.click("#pair")
        page.wait_for_selector('.dir[data-name="smiling"] input.scale', timeout=120_000)
        made = editor.directions["smiling"]
        expected = prompt_direction(engine, [("a face, smiling", "a face, neutral")], 4, 6, 0.0, base_seed=PAIR_FIRST_SEED, progress=False)
        assert torch.allclose(made.delta, expected.delta, atol=1e-5)
        page.eval_on_selector('.dir[data-name="smiling"] input.scale', "el => { el.value = el.max; el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }")
        page.wait_for_function(f"document.getElementById('edited').src !== {hat!r}", timeout=60_000)
        _settle(page)
        assert page.get_attribute("#edited", "src") == _api_final(page)
        assert page.text_content("#error") == "" and errors == []
        page.close()
    finally:
        server.should_exit = True
