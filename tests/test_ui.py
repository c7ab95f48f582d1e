"""The browser editor's API (FastAPI's test client): every endpoint, its errors, tabs that do not disturb
each other, and a saved combination that reproduces the page's image in Python."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from hspace.spec import FREE
from hspace.directions.direction import Direction
from hspace.engine import Engine
from hspace.errors import HspaceError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hspace.ui.server import MAX_UPLOAD_BYTES, Editor, create_app  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    engine = Engine.load("tiny-random")
    gen = torch.Generator().manual_seed(0)
    directions = [
        Direction(torch.randn(STEPS, *engine.h_shape, generator=gen), meta={"name": "pc1", "method": "pca"}, spec=engine.spec),
        Direction(torch.randn(1, *engine.h_shape, generator=gen) * 5, meta={"name": "jac", "method": "jacobian"}, spec=engine.spec),
        Direction(torch.randn(STEPS, *engine.h_shape, generator=gen) * 3, meta={"name": "smile", "method": "supervised"}, spec=FREE),
    ]
    return Editor(engine, directions, tmp_path_factory.mktemp("saved"), steps=STEPS, eta=1.0)


TOKEN = "the-token-of-this-start"
OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def client(editor):
    """The page's own requests: to 127.0.0.1:7860, with the start's token."""
    return TestClient(create_app(editor, port=7860, token=TOKEN), base_url="http://127.0.0.1:7860", headers={"X-Hspace-Token": TOKEN})


def _image(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "hspace editor" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text  # no asset from the internet
    info = client.get("/api/info").json()
    assert [d["name"] for d in info["directions"]] == ["pc1", "jac", "smile"]
    assert [d["unit"] for d in info["directions"]] == ["sigma", "||h_t||", "raw"]
    assert len(info["timesteps"]) == STEPS and info["steps"] == STEPS


def test_saved_combination_reproduces_the_page(client, editor):
    t = editor.timesteps
    parts = [{"name": "pc1", "scale": 1.5, "window": [t[0], t[1]]}, {"name": "jac", "scale": -0.3, "window": None},
             {"name": "smile", "scale": 0.7, "window": [t[2], t[-1]]}]
    shown = client.post("/api/edit", json={"sample": {"seed": 3}, "parts": parts, "raw": True, "strip": [4, 5]}).json()
    edited = torch.from_numpy(np.frombuffer(base64.b64decode(shown["edited_raw"]), dtype=np.float32).copy())
    plain = client.post("/api/edit", json={"sample": {"seed": 3}, "parts": []}).json()
    assert np.array_equal(_image(plain["edited"]), _image(plain["original"]))  # no slider moved: the sample itself
    assert not np.array_equal(_image(shown["edited"]), _image(shown["original"]))
    assert [s["seed"] for s in shown["strip"]] == [4, 5]

    saved = client.post("/api/save", json={"name": "my edit", "parts": parts}).json()["saved"]
    direction = Direction.load(editor.save_dir / saved)
    assert direction.meta["method"] == "combination" and [p["name"] for p in direction.meta["params"]["parts"]] == ["pc1", "jac", "smile"]
    # the saved delta is the combination: scale times delta inside each window, zero outside
    expected = 1.5 * editor.directions["pc1"].delta * torch.tensor([1.0, 1, 0, 0])[:, None, None, None]
    expected = expected - 0.3 * editor.directions["jac"].delta + 0.7 * editor.directions["smile"].delta * torch.tensor([0.0, 0, 1, 1])[:, None, None, None]
    assert torch.allclose(direction.delta, expected, atol=1e-6)
    engine = Engine.load(direction.spec)
    # the page edited seed 3 in one batch with its strip (4, 5): the same batch composition replays it exactly
    # (another composition sums floats in another order: ~1e-5 apart, more or less on another CPU)
    again = engine.edit(engine.sample([3, 4, 5], STEPS, 1.0, progress=False), [direction], [1.0], progress=False).images[0, 0, 0]
    assert torch.equal(again.flatten(), edited)


def test_errors_are_shown_and_the_server_keeps_running(client):
    cases = [
        ({"sample": {"seed": -1}, "parts": []}, "bad seed -1"),
        ({"sample": {"bank": 0}, "parts": []}, "no bank"),
        ({"sample": {"upload": "nope"}, "parts": []}, "no uploaded image"),
        ({"sample": {"seed": 0}, "parts": [{"name": "nope", "scale": 1}]}, "unknown direction 'nope'"),
        ({"sample": {"seed": 0}, "parts": [{"name": "pc1", "scale": "big"}]}, "bad scale"),
        ({"sample": {"seed": 0}, "parts": [{"name": "pc1", "scale": 1, "window": [0, 999]}]}, "larger timestep to the smaller"),
        ({"sample": {"seed": 0}, "parts": [], "strip": list(range(40))}, "at most 16"),
    ]
    for request, message in cases:
        response = client.post("/api/edit", json=request)
        assert response.status_code == 400 and message in response.json()["error"], (request, response.text)
    assert client.post("/api/edit", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 400
    assert "nothing to save" in client.post("/api/save", json={"name": "x", "parts": []}).json()["error"]
    assert "give the direction a name" in client.post("/api/save", json={"name": " ", "parts": []}).json()["error"]
    assert client.post("/api/edit", json={"sample": {"seed": 0}, "parts": []}).status_code == 200  # still serving


def test_save_cannot_leave_the_save_folder(client, editor, tmp_path):
    parts = [{"name": "pc1", "scale": 1.0}]
    saved = client.post("/api/save", json={"name": "../../escape", "parts": parts}).json()["saved"]
    assert "/" not in saved and (editor.save_dir / saved).is_file()
    assert not any(p.name.startswith("escape") for p in editor.save_dir.parent.parent.iterdir())


def test_upload_is_inverted_and_limited(client, editor):
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    upload = client.post("/api/upload", content=buffer.getvalue(), headers=OCTETS).json()["upload"]
    shown = client.post("/api/edit", json={"sample": {"upload": upload}, "parts": []}).json()
    assert _image(shown["original"]).shape == (32, 32, 3)
    # edit-friendly DDPM inversion: the replay reproduces the (centre-cropped, resized) upload
    assert np.abs(_image(shown["edited"]).astype(int) - _image(shown["original"]).astype(int)).max() <= 1
    too_big = client.post("/api/upload", content=b"x" * (MAX_UPLOAD_BYTES + 1), headers=OCTETS)
    assert too_big.status_code == 400 and "at most" in too_big.json()["error"]
    assert "not an image" in client.post("/api/upload", content=b"GIF89a garbage", headers=OCTETS).json()["error"]


def test_jacobian_adds_directions_with_a_painted_mask(client):
    mask = [[1 if 8 <= x < 24 and y < 12 else 0 for x in range(32)] for y in range(32)]
    info = client.post("/api/jacobian", json={"sample": {"seed": 1}, "step": 2, "k": 2, "mask": mask}).json()
    added = info["added"]
    assert len(added) == 2 and all(name in [d["name"] for d in info["directions"]] for name in added)
    assert {d["unit"] for d in info["directions"] if d["name"] in added} == {"||h_t||"}
    assert "k" in client.post("/api/jacobian", json={"sample": {"seed": 1}, "k": 99}).json()["error"]
    assert "painted mask" in client.post("/api/jacobian", json={"sample": {"seed": 1}, "mask": [[0, 0]]}).json()["error"]


def test_tabs_do_not_disturb_each_other(editor):
    """A stale request of one tab is dropped once a newer one of that tab is in; another tab's is not."""
    editor.latest.clear()
    first = editor.edit({"tab": "a", "seq": 5, "sample": {"seed": 0}, "parts": []})
    assert "edited" in first
    assert editor.edit({"tab": "a", "seq": 3, "sample": {"seed": 0}, "parts": []}) == {"superseded": True}
    other = editor.edit({"tab": "b", "seq": 1, "sample": {"seed": 0}, "parts": [{"name": "pc1", "scale": 1}]})
    assert "edited" in other and other["edited"] != first["edited"]
    again = editor.edit({"tab": "a", "seq": 6, "sample": {"seed": 0}, "parts": []})
    assert again["edited"] == first["edited"]  # tab b's sliders did not leak into tab a
    json.dumps(again)


def test_a_preview_is_labelled_and_the_final_is_exact(editor):
    parts = [{"name": "pc1", "scale": 2.0, "window": None}]
    final = editor.edit({"tab": "q", "seq": 1, "quality": "final", "sample": {"seed": 2}, "parts": parts, "raw": True})
    assert final["exact"] and final["quality"] == "final" and final["computed_steps"] == STEPS
    editor.pass_seconds = 1.0  # as on a machine where the exact edit takes seconds: the preview is the approximate one
    preview = editor.edit({"tab": "q", "seq": 2, "quality": "preview", "sample": {"seed": 2}, "parts": parts, "raw": True, "strip": [5]})
    assert not preview["exact"] and preview["computed_steps"] < STEPS and preview["strip"] == []  # the strip waits for the final
    assert preview["edited_raw"] != final["edited_raw"]
    # a window that starts late: the replay starts there (the steps before are the reference's)
    late = [{"name": "pc1", "scale": 2.0, "window": [editor.timesteps[STEPS - 1], editor.timesteps[STEPS - 1]]}]
    assert editor.edit({"tab": "q", "seq": 3, "quality": "final", "sample": {"seed": 2}, "parts": late})["first_step"] == STEPS - 1
    assert "bad quality" in str(pytest.raises(Exception, editor.edit, {"tab": "q", "seq": 4, "quality": "fast", "sample": {"seed": 2}}).value)


def test_a_superseded_request_stops_at_its_next_step(editor):
    """A final image with a strip of 16 new seeds (sampled first, one by one) is overtaken by a newer request of its tab:
    it stops and answers {"superseded": true}; the newer one is answered."""
    import threading

    editor.latest.clear()
    answers = {}
    slow = threading.Thread(target=lambda: answers.setdefault("old", editor.edit(
        {"tab": "s", "seq": 1, "quality": "final", "sample": {"seed": 0}, "parts": [{"name": "pc1", "scale": 1}], "strip": list(range(1000, 1016))})))
    slow.start()
    while not editor.lock.locked():
        pass
    answers["new"] = editor.edit({"tab": "s", "seq": 2, "quality": "final", "sample": {"seed": 0}, "parts": []})
    slow.join()
    assert answers["old"] == {"superseded": True} and "edited" in answers["new"]


def test_saved_directions_are_listed_loaded_and_downloaded(client, editor):
    saved = client.post("/api/save", json={"name": "listed", "parts": [{"name": "pc1", "scale": 0.5, "window": None}]}).json()["saved"]
    listing = client.get("/api/saved").json()["saved"]
    entry = next(e for e in listing if e["file"] == saved)
    assert entry["name"] == "listed" and entry["parts"] == ["pc1 x 0.5"]
    download = client.get(f"/api/saved/{saved}")
    assert download.status_code == 200 and download.content == (editor.save_dir / saved).read_bytes()
    assert client.get(f"/api/saved/{saved}", headers={"X-Hspace-Token": "wrong"}).status_code == 403
    for bad in ["nope.safetensors", "..%2F..%2Fetc%2Fpasswd"]:
        response = client.get(f"/api/saved/{bad}")
        assert response.status_code in (400, 404) and (response.status_code == 404 or "no saved direction" in response.json()["error"])
    loaded = client.post("/api/load", json={"file": saved}).json()
    name = loaded["added"][0]
    assert name == "saved: listed" and name in [d["name"] for d in loaded["directions"]]
    assert torch.allclose(editor.directions[name].delta, 0.5 * editor.directions["pc1"].delta)
    assert "no saved direction" in client.post("/api/load", json={"file": "../x"}).json()["error"]


def test_jacobian_at_a_timestep_gets_a_readable_name(client, editor):
    t = editor.timesteps[1]
    info = client.post("/api/jacobian", json={"sample": {"seed": 1}, "t": t, "k": 1}).json()
    assert info["added"] == [f"jacobian whole image t={t:g} #1"]
    error = client.post("/api/jacobian", json={"sample": {"seed": 1}, "t": 1234.5, "k": 1}).json()["error"]
    assert "t = 1234.5 is not a timestep" in error and f"{editor.timesteps[0]:g}" in error


def test_the_page_is_served_while_the_editor_starts(editor):
    import threading

    from hspace.ui.server import Startup

    release = threading.Event()

    def build(startup):
        startup.report("drawing the starter set", 3, 10)
        release.wait(30)
        return editor

    startup = Startup(build)
    client = TestClient(create_app(startup, port=7860, token=TOKEN), base_url="http://127.0.0.1:7860", headers={"X-Hspace-Token": TOKEN})
    startup.start()
    assert client.get("/").status_code == 200
    deadline = time.monotonic() + 30
    while (info := client.get("/api/info").json()).get("loading", {}).get("done") != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert info == {"loading": {"stage": "drawing the starter set", "done": 3, "total": 10}}
    response = client.post("/api/edit", json={"sample": {"seed": 0}, "parts": []})
    assert response.status_code == 503 and "still starting (drawing the starter set)" in response.json()["error"]
    release.set()
    deadline = time.monotonic() + 30
    while startup.editor is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get("/api/info").json()["steps"] == STEPS

    failed = []
    broken = Startup(lambda startup: Engine.load("no-such-model"))
    broken.start(on_error=lambda: failed.append(True))
    deadline = time.monotonic() + 30
    while not failed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "no-such-model" in broken.status()["load_error"]
    assert "could not start" in str(pytest.raises(Exception, broken.get).value)


def test_starter_directions_are_regression_at_the_norm_of_eq10(tmp_path):
    from hspace.bank import Bank
    from hspace.directions.supervised import direction_from_scores
    from hspace.speed import Speed
    from hspace.ui.starter import starter_directions, starter_folder

    engine = Engine.load("toyfaces")
    directions = starter_directions(engine, tmp_path, 4, 1.0, n=24, k=2)
    by_name = {d.name: d for d in directions}
    assert list(by_name) == ["pc1", "pc2", "smile", "eyes_open", "glasses", "hat"]
    folder = starter_folder(engine, tmp_path, 4, 1.0)
    bank = Bank.open(folder)
    for attribute in ("smile", "hat"):
        eq10 = direction_from_scores(bank, attribute, 4)
        assert by_name[attribute].meta["method"] == "regression"
        assert torch.allclose(by_name[attribute].delta.norm(), eq10.delta.norm(), rtol=1e-5)
        assert not torch.allclose(by_name[attribute].delta / by_name[attribute].delta.norm(), eq10.delta / eq10.delta.norm(), atol=1e-3)
        assert (folder / "starter" / f"{attribute}.safetensors").is_file()
    # another autocast draws its own set beside; channels_last (same samples) reuses it
    assert starter_folder(Engine.load("toyfaces", speed=Speed(channels_last=True)), tmp_path, 4, 1.0) == folder
    assert starter_folder(Engine.load("toyfaces", speed=Speed(autocast="bfloat16")), tmp_path, 4, 1.0) != folder


# ------------------------------------------------------------------ safety: only the editor's own page drives it


def test_the_page_carries_its_token_and_is_not_framed(client):
    page = client.get("/")
    assert f'<meta name="hspace-token" content="{TOKEN}">' in page.text and page.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("host", ["attacker.example:7860", "127.0.0.1:8000", "localhost", "192.168.1.5:7860", ""])
def test_a_foreign_host_is_refused_dns_rebinding(client, host):
    """A rebinding page is same-origin with the editor but names its own host: refused, page and API alike."""
    for path in ("/", "/api/info"):
        response = client.get(path, headers={"Host": host})
        assert response.status_code == 403 and "Host" in response.json()["error"], (host, path)
    for host in ("localhost:7860", "[::1]:7860"):
        assert client.get("/api/info", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "path, body, headers, message",
    [
        # a cross-origin form or fetch without preflight: text/plain, no token
        ("/api/save", '{"name": "evil", "parts": []}', {"Content-Type": "text/plain", "Origin": "http://evil.example", "X-Hspace-Token": ""}, "another site"),
        ("/api/save", '{"name": "evil", "parts": []}', {"Content-Type": "text/plain", "X-Hspace-Token": ""}, "token"),
        ("/api/save", '{"name": "evil", "parts": []}', {"Content-Type": "text/plain"}, "Content-Type application/json"),
        ("/api/save", "name=evil", {"Content-Type": "application/x-www-form-urlencoded"}, "Content-Type application/json"),
        ("/api/save", '{"name": "evil", "parts": []}', {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, "cross-site"),
        ("/api/save", '{"name": "evil", "parts": []}', {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"}, "same-site"),
        ("/api/save", '{"name": "evil", "parts": []}', {"Content-Type": "application/json", "Origin": "http://localhost:3000"}, "another site"),
        ("/api/save", '{"name": "evil", "parts": []}', {"Content-Type": "application/json", "X-Hspace-Token": "guessed"}, "token"),
        ("/api/upload", b"GIF89a", {"Content-Type": "multipart/form-data; boundary=x"}, "application/octet-stream"),
        ("/api/edit", '{"sample": {"seed": 1}, "parts": []}', {"Content-Type": "text/plain"}, "Content-Type application/json"),
        ("/api/jacobian", "{}", {"Content-Type": "text/plain"}, "Content-Type application/json"),
    ],
)
def test_requests_another_page_could_send_are_refused_and_change_nothing(client, editor, path, body, headers, message):
    before = sorted(p.name for p in editor.save_dir.iterdir()) if editor.save_dir.exists() else []
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == 403 and message in response.json()["error"]
    assert (sorted(p.name for p in editor.save_dir.iterdir()) if editor.save_dir.exists() else []) == before
    assert client.get("/api/info", headers={"X-Hspace-Token": ""}).status_code == 403  # reading needs the token too


WRONG = [None, 5, "x", [], {}, [1], {"a": 1}, True, 1e39, -1, 2**70, [[]], "false"]


def _bodies():
    """Every field of every JSON endpoint, and every field of a part and of a sample, set to every wrong type."""
    part = {"name": "pc1", "scale": 1.0, "window": None}
    base = {"/api/edit": {"sample": {"seed": 1}, "parts": [part]}, "/api/save": {"name": "x", "parts": [part]},
            "/api/jacobian": {"sample": {"seed": 1}, "step": 1, "k": 1}}
    fields = {"/api/edit": ["sample", "parts", "asyrp", "strip", "tab", "seq", "raw"], "/api/save": ["name", "parts"],
              "/api/jacobian": ["sample", "step", "k", "part", "mask"]}
    for path, names in fields.items():
        for value in WRONG:
            yield from ((path, {**base[path], name: value}) for name in names)
            yield from ((path, {**base[path], "sample": {kind: value}}) for kind in ("seed", "bank", "upload") if "sample" in names)
            yield from ((path, {**base[path], "parts": [{**part, key: value}]}) for key in part if "parts" in names)


@pytest.mark.slow
def test_json_of_the_wrong_type_is_a_400_with_a_message_never_a_500(editor):
    client = TestClient(create_app(editor, port=7860, token=TOKEN), base_url="http://127.0.0.1:7860", headers={"X-Hspace-Token": TOKEN},
                        raise_server_exceptions=False)
    bodies = list(_bodies())
    assert len(bodies) == 338
    for path, body in bodies:
        response = client.post(path, json=body)
        assert response.status_code in (200, 400, 409), (path, body, response.status_code)  # 409: superseded by a larger seq
        if response.status_code == 400:
            assert response.json()["error"], (path, body)
    shown = client.post("/api/edit", json={"sample": {"seed": 1}, "parts": [], "asyrp": "false"})
    assert shown.status_code == 400 and "bad asyrp 'false'; valid: true or false" in shown.json()["error"]


@pytest.mark.parametrize("names", [["mine", "mine"], ["a/b", "a_b"], ["x" * 200, "x" * 200], ["../up", ".._up"]])
def test_save_never_replaces_a_file_and_says_when_it_renamed(editor, client, names):
    parts = [{"name": "pc1", "scale": 1.0, "window": None}]
    before = set(p.name for p in editor.save_dir.iterdir()) if editor.save_dir.exists() else set()
    first, second = (client.post("/api/save", json={"name": n, "parts": parts}).json() for n in names)
    assert first["saved"] != second["saved"] and second["renamed"] and first["saved"].endswith(".safetensors")
    assert second["saved"].endswith("-2.safetensors") and len(first["saved"]) <= 122
    assert set(p.name for p in editor.save_dir.iterdir()) - before == {first["saved"], second["saved"]}
    assert Direction.load(editor.save_dir / second["saved"]).name == names[1]


def test_what_requests_fill_stays_bounded(editor, client, monkeypatch):
    """Requests cannot grow the server without bound: cached samples and uploads (64 each), tabs remembered (1024),
    and directions computed on request (64, then a message)."""
    from hspace.ui import editor as server

    for tab in range(server.MAX_TABS + 50):
        editor.latest.put(str(tab), 1)
    assert len(editor.latest) == server.MAX_TABS
    for seed in range(server.CACHED + 3):
        editor.samples.put(seed, None)
    assert len(editor.samples) == server.CACHED
    editor.samples.clear()
    monkeypatch.setattr(editor, "added", server.MAX_ADDED - 1)
    refused = client.post("/api/jacobian", json={"sample": {"seed": 1}, "step": 1, "k": 2})
    assert refused.status_code == 400 and "at most 64" in refused.json()["error"]
    added = client.post("/api/jacobian", json={"sample": {"seed": 1}, "step": 1, "k": 1}).json()["added"]
    assert len(added) == 1 and editor.added == server.MAX_ADDED


def _brightness(images: torch.Tensor) -> dict:
    """A scorer for the tiny random model (it has no domain): how bright each image is, as a probability."""
    return {"bright": torch.sigmoid(200 * (images.mean((1, 2, 3)) + 0.035)), "red": torch.sigmoid(40 * (images[:, 0] - images[:, 2]).mean((1, 2)))}


def test_a_card_made_from_the_editor_is_the_card_and_the_slider_moves_in_its_unit(tmp_path):
    import threading

    from hspace.card import card

    engine = Engine.load("tiny-random")
    # a direction strong enough to brighten the tiny model's samples (their mean pixel -0.05 -> +0.01 at raw scale 4)
    direction = Direction(torch.randn(STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(3)) * 400,
                          meta={"name": "pc1", "method": "pca"}, spec=engine.spec)
    editor = Editor(engine, [direction], tmp_path / "saved", steps=STEPS, eta=1.0, scorer=_brightness)
    client = TestClient(create_app(editor, port=7860, token=TOKEN), base_url="http://127.0.0.1:7860", headers={"X-Hspace-Token": TOKEN})
    info = client.get("/api/info").json()
    assert info["can_card"] is True and info["job"] is None and info["directions"][0]["card"] is None

    # the progress of a card being measured is read from /api/info meanwhile (a real second thread)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(client.post("/api/card", json={"name": "pc1", "n": 6})))
    worker.start()
    jobs = []
    while worker.is_alive():
        job = client.get("/api/info").json()["job"]
        if job is not None and job["total"]:
            jobs.append(job)
        time.sleep(0.01)
    worker.join()
    response = seen[0]
    assert response.status_code == 200, response.text
    assert jobs and all(j["what"] == "card of pc1" and 0 <= j["done"] <= j["total"] for j in jobs)
    made = response.json()["made"]
    # the same card as card() measures in Python with the editor's process
    expected = card(direction, engine, n=6, num_steps=STEPS, eta=1.0, scorer=_brightness, progress=False)
    assert made["target"] == expected.target
    assert made["unit"] == (pytest.approx(expected.calibration["scale"]) if expected.calibration["scale"] is not None else None)
    assert (tmp_path / "saved" / "cards" / "pc1" / "card.md").is_file() and response.json()["job"] is None
    shown = response.json()["directions"][0]
    assert made["unit"] is not None and 0 < made["unit"] <= 4  # the sweep reaches half the flips of "bright"
    # the slider moves in effect units: its combination is effect x unit
    assert shown["card"]["unit"] == pytest.approx(made["unit"]) and shown["unit"].startswith("effect")
    combination = editor.combination([{"name": "pc1", "scale": 1.0, "window": None}])
    assert torch.allclose(combination.delta, made["unit"] * direction.delta, rtol=1e-5, atol=1e-6)

    for body, message in [({"name": "nope"}, "unknown direction 'nope'"), ({"name": "pc1", "n": 1}, "n"), ({"name": "pc1", "n": True}, "n")]:
        answer = client.post("/api/card", json=body)
        assert answer.status_code == 400 and message in answer.json()["error"]
    plain = Editor(engine, [direction], tmp_path / "other", steps=STEPS, eta=1.0)  # no scorer, no domain: no card button, a clear refusal
    assert plain.info()["can_card"] is False
    from hspace.domains import get_domain

    named = Editor(engine, [direction], tmp_path / "named", steps=STEPS, eta=1.0, scorer_domain=get_domain("toyfaces"))  # --scorer toyfaces
    assert named.info()["can_card"] is True
    with pytest.raises(HspaceError, match="no scorer measures 'tiny-random'"):
        plain.make_card({"name": "pc1"})


def test_a_text_to_image_editor_draws_each_seed_under_its_prompt_and_makes_prompt_pair_sliders(tmp_path):
    """The prompt of a sample (and of its strip) is the one it is drawn and edited under; a prompt-pair slider made by the
    API is prompt_direction's; an unconditional editor refuses both; bad values name themselves."""
    import tiny_sd

    from hspace.directions.prompts import prompt_direction
    from hspace.ui.editor import PAIR_FIRST_SEED

    tiny_sd.sd_pipeline(tmp_path / "sd")
    engine = Engine.load(str(tmp_path / "sd"), guidance=3.0)
    editor = Editor(engine, [], tmp_path / "saved", steps=STEPS, eta=1.0)
    client = TestClient(create_app(editor, port=7860, token=TOKEN), base_url="http://127.0.0.1:7860", headers={"X-Hspace-Token": TOKEN})
    assert editor.info()["conditional"] is True
    response = client.post("/api/prompt-direction", json={"plus": "a smiling cat", "minus": "a cat", "n": 3})
    assert response.status_code == 200 and response.json()["added"] == ["smiling"]
    assert [d["name"] for d in response.json()["directions"]] == ["smiling"]
    bad = client.post("/api/prompt-direction", json={"plus": 5})
    assert bad.status_code == 400 and bad.json()["error"] == "bad plus 5; valid: the prompt with the attribute, a string"
    expected = prompt_direction(engine, [("a smiling cat", "a cat")], 3, STEPS, 1.0, base_seed=PAIR_FIRST_SEED, progress=False)
    assert torch.equal(editor.directions["smiling"].delta, expected.delta)

    shown = editor.edit({"sample": {"seed": 5, "prompt": "a dog"}, "parts": [{"name": "smiling", "scale": 2.0}], "strip": [6]})
    dog = engine.conditioned(prompt="a dog")
    drawn = dog.sample([5, 6], STEPS, 1.0, progress=False)
    edited = dog.edit(drawn, expected, [2.0], progress=False).images[0, 0]
    assert _decoded(shown["original"]).shape == _decoded(shown["edited"]).shape
    assert np.abs(_decoded(shown["original"]) - _pixels(drawn.images[0])).max() <= 1
    assert np.abs(_decoded(shown["edited"]) - _pixels(edited[0])).max() <= 1
    assert np.abs(_decoded(shown["strip"][0]["edited"]) - _pixels(edited[1])).max() <= 1
    cat = editor.edit({"sample": {"seed": 5}, "parts": []})["original"]  # without a prompt: the engine's ("")
    assert np.abs(_decoded(cat) - _pixels(engine.sample([5], STEPS, 1.0, progress=False).images[0])).max() <= 1
    assert cat != shown["original"]

    with pytest.raises(HspaceError, match="bad prompt 3; valid: a string"):
        editor.edit({"sample": {"seed": 5, "prompt": 3}, "parts": []})
    with pytest.raises(HspaceError, match="give the prompt with the attribute"):
        editor.prompt_slider({"plus": "  ", "minus": "a cat"})
    with pytest.raises(HspaceError, match="bad n 0"):
        editor.prompt_slider({"plus": "a red cat", "n": 0})
    with pytest.raises(HspaceError, match="same prompt on both sides"):
        editor.prompt_slider({"plus": "a cat", "minus": "a cat", "n": 2})
    plain = Editor(Engine.load("tiny-random"), [], tmp_path / "plain", steps=STEPS, eta=1.0)
    with pytest.raises(HspaceError, match="unconditional"):
        plain.prompt_slider({"plus": "a cat"})
    with pytest.raises(HspaceError, match="unconditional model: it takes no prompts"):
        plain.edit({"sample": {"seed": 1, "prompt": "a cat"}, "parts": []})


def _decoded(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")).astype(int)


def _pixels(image: torch.Tensor) -> np.ndarray:
    from hspace.images import to_pil

    return np.asarray(to_pil(image)).astype(int)
