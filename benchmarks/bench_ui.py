"""The editor, live: from a slider input to the image shown, in Chromium, on the bundled model.

    python benchmarks/bench_ui.py [--moves 24] [--steps 25] [--workdir DIR] [--server-args=--eager-preview] [--chromium PATH]

Starts `hspace ui` as a user would (a subprocess, on a free port, with an empty workdir unless --workdir is
given) and prints:
- first start: seconds from launching the command to the URL printed and to the page served (HTTP 200), and
  until the editor is ready (its starter set drawn);
- moves: --moves clicks at random positions on the tracks of the first sliders (the machine's real mouse
  events: pointerdown, input, pointerup, change), each followed by a rest. For each, the time from the input
  event to the first image shown for it (a preview, labelled so in the page) and to the exact image, median
  and p90, with the server's own time beside them;
- drag: a 4 s drag across a slider (a mouse move every 25 ms): images shown per second while dragging, how
  many were marked stale, and whether the image shown after the release is the exact edit of the final
  slider position (compared with the API's answer for the same combination);
- the load average before and after, and the machine's CPU count.

    python benchmarks/bench_ui.py --fidelity [--steps 25]

instead measures the preview itself (no browser): for the starter directions of the bundled model (its 6 PCs at
2 sigma, its 4 attribute directions at scale 1) on 4 seeds, the mean absolute difference between the preview and
the exact edit, relative to the exact edit's own change, and the time of each against the exact edit in the same
run; beside the editor's schedule, the denoiser at every 2nd and every 3rd step.

Needs playwright and a system Chromium (apt-get install chromium); `playwright install` is not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

MARK_INPUTS = """() => { window.__inputs = []; document.addEventListener('input', () => window.__inputs.push({t: performance.now(), v: window.hspace.version}), true); }"""


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def launch(workdir: str, steps: int, extra: list[str] = ()):
    command = [sys.executable, "-m", "hspace", "ui", "--port", "0", "--workdir", workdir, "--save-dir", os.path.join(workdir, "saved"),
               "--steps", str(steps), *extra]
    began = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "server.log"), "w"), text=True)
    line = server.stdout.readline()
    printed = time.perf_counter() - began
    match = re.search(r"http://\S+/", line)
    if not match:
        server.kill()
        raise SystemExit(f"hspace ui printed no URL: {line!r}; see {workdir}/server.log")
    url = match.group(0)
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    served = time.perf_counter() - began
    return server, url, printed, served, began


def fidelity(steps: int, workdir: str) -> None:
    from hspace import preview
    from hspace.engine import Engine
    from hspace.ui.starter import starter_directions

    engine = Engine.load()
    directions = starter_directions(engine, workdir, steps, 1.0)
    schedules = {"editor's preview (preview_steps)": preview.preview_steps(0, steps), "every 2nd step": list(range(0, steps, 2)),
                 "every 3rd step": list(range(0, steps, 3))}
    errors = {name: [] for name in schedules}
    seconds = {name: 0.0 for name in ["exact", *schedules]}
    for seed in range(4):
        trajectory, reference = preview.sample(engine, [seed], steps, 1.0, record_h=False, progress=False)
        for d in directions:
            delta = engine.direction_at(d, steps).per_step(steps) * (2.0 if d.meta.get("method") == "pca" else 1.0)
            began = time.perf_counter()
            exact = preview.edit(engine, trajectory, reference, delta)
            seconds["exact"] += time.perf_counter() - began
            change = (exact - trajectory.images).abs().mean()
            for name, computed in schedules.items():
                began = time.perf_counter()
                x0 = preview.edit(engine, trajectory, reference, delta, computed=computed)
                seconds[name] += time.perf_counter() - began
                errors[name].append(float((x0 - exact).abs().mean() / change))
    print(f"preview fidelity on the bundled model, {steps} steps, {len(errors['every 2nd step'])} edits (10 directions x 4 seeds):")
    print("| denoiser runs at | passes | time / exact | difference from the exact edit / the edit's change: median | max |")
    print("|---|---|---|---|---|")
    for name, computed in schedules.items():
        values = sorted(errors[name])
        print(f"| {name} | {len(computed)} of {steps} | {seconds[name] / seconds['exact']:.2f} | {statistics.median(values):.2f} | {values[-1]:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moves", type=int, default=24)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--workdir", default=None, help="reuse a workdir (default: a new empty one: a first start)")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="more options of hspace ui, e.g. '--eager-preview' or '--channels-last'")
    p.add_argument("--fidelity", action="store_true", help="measure the preview against the exact edit (no browser)")
    args = p.parse_args()
    if args.fidelity:
        fidelity(args.steps, args.workdir or tempfile.mkdtemp(prefix="hspace-ui-bench-"))
        return
    from playwright.sync_api import sync_playwright

    rng = random.Random(args.seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="hspace-ui-bench-")
    os.makedirs(workdir, exist_ok=True)
    empty = not os.listdir(workdir)
    load_before = os.getloadavg()
    server, url, printed, served, began = launch(workdir, args.steps, args.server_args.split())
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector(".dir input.scale", timeout=900_000)
            ready = time.perf_counter() - began
            page.wait_for_function("window.hspace.finalVersion === window.hspace.version", timeout=120_000)
            while (denoiser := page.evaluate("api('/api/info').then((i) => i.preview_denoiser)")) == "compiling":
                time.sleep(0.5)
            compiled = time.perf_counter() - began
            page.evaluate(MARK_INPUTS)
            sliders = page.locator(".dir input.scale")
            count = min(4, sliders.count())

            first, final, server_preview, server_final = [], [], [], []
            for move in range(args.moves):
                slider = sliders.nth(move % count)
                box = slider.bounding_box()
                n_inputs = page.evaluate("window.__inputs.length")
                now = float(slider.evaluate("(el) => (el.value - el.min) / (el.max - el.min)"))
                where = rng.uniform(0.08, 0.92)
                while abs(where - now) < 0.1:  # a click on the thumb itself moves nothing
                    where = rng.uniform(0.08, 0.92)
                page.mouse.click(box["x"] + box["width"] * where, box["y"] + box["height"] / 2)
                page.wait_for_function(f"window.__inputs.length > {n_inputs}", timeout=10_000, polling=100)
                page.wait_for_function("window.hspace.finalVersion === window.hspace.version", timeout=60_000, polling=100)
                page.wait_for_timeout(150)  # the last frame is recorded after it is painted
                record = page.evaluate(f"""() => {{
                    const input = window.__inputs[{n_inputs}], v = window.hspace.version;
                    const shown = window.hspace.shown.filter((s) => s.version >= input.v + 1);
                    const exact = shown.find((s) => s.quality === 'exact' && s.version === v);
                    return {{input: input.t, first: shown[0], exact}};
                }}""")
                first.append(record["first"]["at"] - record["input"])
                final.append(record["exact"]["at"] - record["input"])
                (server_preview if record["first"]["quality"] == "preview" else server_final).append(record["first"]["server_ms"])
                server_final.append(record["exact"]["server_ms"])
                print(f"move {move + 1}: first image {first[-1]:.0f} ms ({record['first']['quality']}, server {record['first']['server_ms']:.0f}), "
                      f"exact {final[-1]:.0f} ms (server {record['exact']['server_ms']:.0f})", file=sys.stderr, flush=True)
                page.wait_for_timeout(rng.uniform(200, 500))

            # a drag: 4 s, a mouse move every 25 ms
            slider = sliders.nth(0)
            box = slider.bounding_box()
            y = box["y"] + box["height"] / 2
            shown_before = page.evaluate("window.hspace.shown.length")
            page.mouse.move(box["x"] + box["width"] * 0.5, y)
            page.mouse.down()
            drag_began = time.perf_counter()
            stale_seen = 0
            for i in range(100):
                page.mouse.move(box["x"] + box["width"] * (0.5 + 0.45 * __import__("math").sin(i / 100 * 6.283 * 1.5)), y)
                if i % 12 == 0:
                    stale_seen += page.evaluate("document.getElementById('edited').classList.contains('stale')")
                page.wait_for_timeout(25)
            drag_seconds = time.perf_counter() - drag_began
            during = page.evaluate(f"window.hspace.shown.slice({shown_before}).length")
            page.mouse.up()
            page.wait_for_function("window.hspace.finalVersion === window.hspace.version", timeout=60_000, polling=100)
            page.wait_for_timeout(150)
            shown_src = page.get_attribute("#edited", "src")
            state = page.evaluate("""() => ({parts: parts(), sample: sample()})""")
            token = page.get_attribute('meta[name="hspace-token"]', "content")
            request = urllib.request.Request(url + "api/edit", data=json.dumps({"tab": "bench", "seq": 0, "quality": "final", **state}).encode(),
                                             headers={"Content-Type": "application/json", "X-Hspace-Token": token})
            with urllib.request.urlopen(request) as response:
                expected = json.loads(response.read())["edited"]
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    load_after = os.getloadavg()

    print(f"hspace ui {args.server_args}".rstrip() + f"; machine: {os.cpu_count()} CPUs; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"first start ({'empty workdir' if empty else 'workdir drawn before'}): URL printed after {printed:.1f} s, page served after "
          f"{served:.1f} s, editor ready after {ready:.1f} s; previews' denoiser {denoiser} after {compiled:.1f} s")
    print(f"\n{args.moves} moves on the bundled model at {args.steps} steps (ms, input event to image shown):")
    print("| | median | p90 | server median |")
    print("|---|---|---|---|")
    print(f"| first image (preview) | {statistics.median(first):.0f} | {percentile(first, 0.9):.0f} | "
          f"{statistics.median(server_preview) if server_preview else float('nan'):.0f} |")
    print(f"| exact image | {statistics.median(final):.0f} | {percentile(final, 0.9):.0f} | {statistics.median(server_final):.0f} |")
    print(f"\ndrag of {drag_seconds:.1f} s: {during} images shown while dragging ({during / drag_seconds:.1f} per second); "
          f"stale mark seen at {stale_seen} of 9 checks; the image after release is the exact edit of the final position: {shown_src == expected}")
    if errors:
        print(f"page errors: {errors}")


if __name__ == "__main__":
    main()
