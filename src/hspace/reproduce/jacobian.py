"""Sec. 4.2, Fig. 7: the top singular vectors of the Jacobian make localized changes, and the same
direction makes a similar change in other samples.

Measured on rendered faces (real images, inverted exactly by edit-friendly DDPM inversion), whose own
part masks are known: the share of the pixel change inside the part's own mask dilated by 2 px, and
the concentration (that share over the mask's share of the image). Protocols: the step the directions
are found at (early, middle, late), with or without the output mask, applied at every step or from the
found step on, and with delta-h restricted to the cells of h that lie over the part (renormalised)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..images import labelled_grid
from .runner import DOMAIN, Run, holds, mean_interval, pct, verdict

NAME = "jacobian"
PARTS = ("eyes", "mouth")
FACE_SEEDS = 60_000_000  # rendered faces outside the training pool and the classifier's seeds
INSIDE_SOURCE, INSIDE_TRANSFER, CONCENTRATION = 0.6, 0.5, 4.0
GAMMA = 0.3


def measure(run: Run) -> dict:
    c = run.config
    faces, masks = _faces(run, c.jacobian_transfer + 1)
    steps = {k: v for k, v in {"early": c.steps // 4, "middle": c.steps // 2, "late": (7 * c.steps) // 10}.items() if k in c.jacobian_found_at}
    rows, found = [], {}
    for part, (when, step), masked in itertools.product(PARTS, steps.items(), (True, False)):
        found[part, step, masked] = _direction(run, faces, masks[part][0], step, masked)
        for window, cells in itertools.product(("all", "from_step"), (False, True)):
            images = _variant(run, faces, found[part, step, masked], masks[part][0], step, window, cells)
            inside, concentration = _locality(images, faces.images, masks[part])
            rows.append({
                "part": part, "found_at": when, "step": step, "output_mask": masked, "window": window, "h_cells": cells,
                "inside_source": float(inside[0]), "inside_transfer": float(inside[1:].mean()),
                "concentration_source": float(concentration[0]), "concentration_transfer": float(concentration[1:].mean()),
                "inside_transfer_interval": mean_interval(inside[1:]), "concentration_transfer_interval": mean_interval(concentration[1:]),
            })
    best = {part: max((r for r in rows if r["part"] == part), key=lambda r: (r["inside_source"] + r["inside_transfer"])) for part in PARTS}
    grid = _figure(run, faces, masks, best, found)
    return {"faces": len(faces), "rows": rows, "best": best, "grid": grid}


def judge(res: dict) -> dict:
    """The best protocol per part. Holds when, for every part, the transfers clear their targets beyond their 95%
    intervals over faces and the source (one face: no interval) meets its target; fails when some part's source
    misses it or a transfer interval lies below its target."""
    best = res["best"]
    ok = all(
        b["inside_source"] >= INSIDE_SOURCE and b["inside_transfer_interval"][0] >= INSIDE_TRANSFER
        and b["concentration_transfer_interval"][0] >= CONCENTRATION
        for b in best.values()
    )
    short = any(
        b["inside_source"] < INSIDE_SOURCE or b["inside_transfer_interval"][1] < INSIDE_TRANSFER
        or b["concentration_transfer_interval"][1] < CONCENTRATION
        for b in best.values()
    )
    intervals = {f"{p}_{k}": b[f"{k}_interval"] for p, b in best.items() for k in ("inside_transfer", "concentration_transfer")}
    return verdict(ok, short, intervals, inside_source=INSIDE_SOURCE, inside_transfer=INSIDE_TRANSFER, concentration=CONCENTRATION, gamma=GAMMA)


def _faces(run: Run, n: int):
    """n rendered faces inverted into trajectories, and their part masks dilated by 2 px."""
    from ..inversion import invert

    images, _, masks = DOMAIN.render(range(FACE_SEEDS, FACE_SEEDS + n), run.engine.image_size[0])
    trajectory = invert(run.engine, images, run.config.steps, 1.0, batch_size=run.config.batch_size)
    dilated = {p: F.max_pool2d(m[:, None].float(), 5, stride=1, padding=2)[:, 0] for p, m in masks.items() if p in PARTS}
    return trajectory, dilated


def _direction(run: Run, faces, own_mask: torch.Tensor, step: int, masked: bool):
    from ..directions.jacobian import jacobian_directions

    mask = own_mask if masked else None
    found = jacobian_directions(
        run.engine, faces, 0, step, k=1, mask=mask, mask_name="own part" if masked else None,
        max_iter=run.config.jacobian_max_iter, generator=torch.Generator().manual_seed(0),
    )
    return found.directions[0]


def _variant(run: Run, faces, found, own_mask: torch.Tensor, step: int, window: str, cells: bool, shown=None):
    """Images [2, B, ...] of the faces edited at -gamma and +gamma by the direction under one protocol."""
    from ..directions.jacobian import restrict_to_region

    direction = restrict_to_region(found, own_mask) if cells else found
    span = None if window == "all" else (float(faces.timesteps[step]), 0)
    return run.engine.edit(faces if shown is None else shown, direction, [-GAMMA, GAMMA], window=span, batch_size=run.config.batch_size).images[0]


def _locality(images: torch.Tensor, originals: torch.Tensor, masks: torch.Tensor):
    """Share of the pixel change inside each sample's own mask, and that share over the mask's area share."""
    moved = (images - originals[None]).abs().sum(dim=2)  # [S, B, H, W]
    inside = (moved * masks[None]).sum(dim=(-1, -2)) / moved.sum(dim=(-1, -2)).clamp_min(1e-12)  # [S, B]
    area = masks.mean(dim=(-1, -2))  # [B]
    return inside.mean(0), (inside / area.clamp_min(1e-12)).mean(0)


def _figure(run: Run, faces, masks, best, found) -> str:
    rows, names = [], []
    shown = faces[list(range(min(4, len(faces))))]
    for part, b in best.items():
        direction = found[part, b["step"], b["output_mask"]]
        images = _variant(run, faces, direction, masks[part][0], b["step"], b["window"], b["h_cells"], shown)
        rows += [torch.stack([images[0, i], shown.images[i], images[1, i]]) for i in range(len(shown))]
        names += [f"{part} / {'source' if i == 0 else 'transfer'}" for i in range(len(shown))]
    return run.figure(labelled_grid(torch.stack(rows), names, [f"-{GAMMA:g}", "0", f"+{GAMMA:g}"]), "jacobian.png")


def render(res: dict, config) -> list[str]:
    t = res["verdict"]["thresholds"]
    lines = [
        "## Jacobian directions are local and transfer (Sec. 4.2, Fig. 7)",
        "",
        "Claim: the top singular vectors of the Jacobian make localized changes, and the same direction makes a similar "
        "change in other samples.",
        "",
        f"{res['faces']} rendered faces (real images with known part masks), inverted exactly; the top direction of the first "
        f"face at +-{t['gamma']:g} ||h_t||, transferred to the others. Inside: the share of the pixel change inside each face's "
        "own part mask dilated by 2 px; concentration: that share over the mask's share of the image. Target (the best "
        f"protocol per part): >= {pct(t['inside_source'])} inside on the source, >= {pct(t['inside_transfer'])} on the transfers, "
        f"concentration >= {t['concentration']:g}x; on the transfers, the lower end of the 95% interval over faces (the "
        "source is one face).",
        "",
        "| part | found at | output mask | applied | delta-h | inside (source) | inside (transfer) | concentration (transfer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['part']} | {r['found_at']} (step {r['step']}) | {'yes' if r['output_mask'] else 'no'} | "
        f"{'every step' if r['window'] == 'all' else 'from the found step'} | {'part cells' if r['h_cells'] else 'all cells'} | "
        f"{pct(r['inside_source'])} | {pct(r['inside_transfer'])} | {r['concentration_transfer']:.1f}x |"
        for r in res["rows"]
    ]
    best = "; ".join(
        f"{p}: found {b['found_at']}, {'masked' if b['output_mask'] else 'unmasked'}, {b['window']}, "
        f"{'part cells' if b['h_cells'] else 'all cells'} ({pct(b['inside_source'])} / {pct(b['inside_transfer'])}, {b['concentration_transfer']:.1f}x)"
        for p, b in res["best"].items()
    )
    lines += ["", f"Best protocol per part: {best}: {holds(res)}.", "", f"![jacobian]({res['grid']})", ""]
    return lines


def headline(res: dict) -> str:
    """One line for a side-by-side table."""
    return "; ".join(f"{part}: {100 * b['inside_transfer']:.0f}% inside on other faces, concentration {b['concentration_transfer']:.1f}x"
                     for part, b in res["best"].items())
