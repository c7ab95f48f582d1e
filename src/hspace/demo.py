"""The main job: sample the bundled model, swap h between samples, edit by vector arithmetic."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .directions.supervised import mean_difference
from .engine import Engine
from .images import labelled_grid
from .loading import DEFAULT_MODEL


def run_demo(
    out: str | Path,
    model: str | None = None,
    steps: int = 50,
    device: str | None = None,
    progress_factory: Callable[[str], Callable] | None = None,
) -> list[Path]:
    """Write the demo figures into ``out``; returns their paths (an index.md first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine.load(model or DEFAULT_MODEL, device=device)

    def run(desc: str, fn: Callable):
        """Call ``fn(callback)`` under a progress bar of its own, closed when the stage ends."""
        bar = None if progress_factory is None else progress_factory(desc)
        try:
            return fn(bar)
        finally:
            if bar is not None:
                bar.close()

    figures: list[tuple[str, str]] = []

    def save(image, name, caption):
        image.save(out / name)
        figures.append((name, caption))

    seeds = list(range(8))
    ddpm = run("samples, eta=1", lambda cb: engine.sample(seeds, steps, eta=1.0, callback=cb))
    ddim = run("samples, eta=0", lambda cb: engine.sample(seeds, steps, eta=0.0, callback=cb))
    save(
        labelled_grid(torch.stack([ddpm.images, ddim.images]), ["eta=1", "eta=0"], [f"seed {s}" for s in seeds]),
        "samples.png",
        f"Samples of {engine.name} ({steps} steps): DDPM (eta=1) and DDIM (eta=0) from the same seeds.",
    )

    a, b = ddpm[[0, 1, 2, 3]], ddpm[[4, 5, 6, 7]]
    swapped = run("h-swap", lambda cb: engine.swap(a, b, callback=cb))
    save(
        labelled_grid(torch.stack([a.images, b.images, swapped.images], 1), [f"{i}<-h{j}" for i, j in zip(a.seeds, b.seeds)], ["sample", "h donor", "swapped"]),
        "swap.png",
        "h-swap (paper Fig. 3): each sample replayed with its own x_T and z but the donor's h_t at every step.",
    )

    scales = [-1.0, -0.5, 0.0, 0.5, 1.0]
    targets = ddpm[[2, 3, 4, 5]]
    # Vector arithmetic (Fig. 4): h of one sample minus h of another; on toy faces, the sample the
    # classifier finds most smiling minus the least smiling one.
    plus, minus, label = ddpm[[0]], ddpm[[1]], "h(seed 0) - h(seed 1)"
    if engine.name == "toyfaces":
        from .toyfaces.classifier import classify

        pool = run("annotated samples", lambda cb: engine.sample(range(1000, 1048), steps, eta=1.0, callback=cb))
        scores = classify(pool.images)
        smile = scores["smile"].argsort(descending=True).tolist()
        plus, minus, label = pool[smile[:1]], pool[smile[-1:]], "h(smiling) - h(not smiling)"
    direction = mean_difference(plus, minus, name=label)
    edits = run("vector arithmetic", lambda cb: engine.edit(targets, direction, scales, callback=cb))[0]
    save(
        labelled_grid(edits.transpose(0, 1), [f"seed {s}" for s in targets.seeds], [f"{s:g}" for s in scales]),
        "arithmetic.png",
        f"Vector arithmetic (paper Fig. 4): {label} added to other samples at scales gamma (one batched replay).",
    )
    if engine.name == "toyfaces":
        # Directions from classifier annotation (eq. 10): top 8 minus bottom 8 of the 48 samples per attribute.
        names = ("smile", "glasses", "hat", "eyes_open")
        directions = []
        for name in names:
            order = scores[name].argsort(descending=True).tolist()
            directions.append(mean_difference(pool[order[:8]], pool[order[-8:]], name=name))
        edits = run("attribute edits", lambda cb: engine.edit(targets[[0, 1]], directions, scales, callback=cb))
        rows = [f"{d.name} / seed {s}" for d in directions for s in targets.seeds[:2]]
        save(
            labelled_grid(edits.transpose(1, 2).reshape(-1, len(scales), *edits.shape[3:]), rows, [f"{s:g}" for s in scales]),
            "attributes.png",
            "Attribute directions from classifier annotation (paper eq. 10): mean h of the 8 samples the classifier "
            "scores highest minus the 8 lowest, of 48, added at scales gamma.",
        )

    single = run("single pass", lambda cb: engine.edit(targets[[0]], direction, scales, callback=cb))[0, :, 0]
    asyrp = run("asyrp", lambda cb: engine.edit(targets[[0]], direction, scales, asyrp=True, callback=cb))[0, :, 0]
    save(
        labelled_grid(torch.stack([single, asyrp]), ["single pass", "Asyrp"], [f"{s:g}" for s in scales]),
        "asyrp.png",
        "Injection into P_t and D_t (one U-Net pass per step, the paper's choice) vs Asyrp (P_t only, two passes).",
    )

    index = out / "index.md"
    lines = [f"# hspace demo: {engine.name}", ""]
    for name, caption in figures:
        lines += [f"## {name}", "", caption, "", f"![{name}]({name})", ""]
    index.write_text("\n".join(lines))
    return [index] + [out / name for name, _ in figures]
