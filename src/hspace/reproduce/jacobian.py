"""Sec. 4.2, Fig. 7: the top singular vectors of the Jacobian make localized changes, and the same
direction makes a similar change in other samples."""

from __future__ import annotations

import torch

from ..images import labelled_grid
from .runner import DOMAIN, Run, holds, pct, verdict

NAME = "jacobian"
PARTS = ("eyes", "mouth")
INSIDE = 0.7  # share of the pixel change inside the mask, for the top direction of each mask
GAMMA = 0.3


def measure(run: Run) -> dict:
    from ..directions.jacobian import jacobian_directions

    c = run.config
    samples = run.test_samples(c.jacobian_transfer + 1, NAME)
    source, at = samples[[0]], (7 * c.steps) // 10
    rows, grids = [], []
    for part in PARTS:
        mask = DOMAIN.part_mask(part, run.engine.sample_shape[-1])
        found = jacobian_directions(run.engine, source, 0, at, k=c.jacobian_k, mask=mask, mask_name=part, generator=torch.Generator().manual_seed(0))[0]
        images = run.engine.edit(samples, found.directions, [-GAMMA, GAMMA], batch_size=c.batch_size)
        moved = (images - samples.images[None, None]).abs().sum(dim=3)  # [D, S, B, H, W]
        inside = (moved * mask).sum(dim=(-1, -2)) / moved.sum(dim=(-1, -2)).clamp_min(1e-12)  # [D, S, B]
        rows += [
            {
                "mask": part, "index": i, "singular_value": float(found.singular_values[i]),
                "inside_source": float(inside[i, :, 0].mean()), "inside_transfer": float(inside[i, :, 1:].mean()),
            }
            for i in range(c.jacobian_k)
        ]
        original = samples.images[None, None].expand(images.shape[0], 1, *samples.images.shape)
        grids.append(torch.cat([images[:, :1], original, images[:, 1:]], dim=1)[:, :, :4])  # -gamma, unedited, +gamma
    figure = torch.cat([g.permute(0, 2, 1, 3, 4, 5).reshape(-1, 3, *g.shape[3:]) for g in grids])
    names = [f"{p}{i + 1} / {'source' if b == 0 else 'transfer'}" for p in PARTS for i in range(c.jacobian_k) for b in range(min(4, len(samples)))]
    grid = run.figure(labelled_grid(figure, names, [f"-{GAMMA:g}", "0", f"+{GAMMA:g}"]), "jacobian.png")
    tops = [r for r in rows if r["index"] == 0]
    ok = all(r["inside_source"] >= INSIDE and r["inside_transfer"] >= INSIDE for r in tops)
    return {"step": at, "rows": rows, "grid": grid, "verdict": verdict(ok, inside=INSIDE, gamma=GAMMA)}


def render(res: dict, config) -> list[str]:
    t = res["verdict"]["thresholds"]
    lines = [
        "## Jacobian directions are local and transfer (Sec. 4.2, Fig. 7)",
        "",
        "Claim: the top singular vectors of the Jacobian make localized changes, and the same direction makes a similar "
        "change in other samples.",
        "",
        f"Masked directions (eyes, mouth region) at step {res['step']}, applied at all steps at +-{t['gamma']:g} ||h_t||: the "
        "share of the pixel change inside the mask, on the source sample and on the transfer samples. Target: >= "
        f"{pct(t['inside'])} for the top masked directions.",
        "",
        "| direction | singular value | inside (source) | inside (transfer) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['mask']}{r['index'] + 1} | {r['singular_value']:.3g} | {pct(r['inside_source'])} | {pct(r['inside_transfer'])} |" for r in res["rows"]]
    lines += ["", f"Result (top direction per mask): {holds(res)}.", "", f"![jacobian]({res['grid']})", ""]
    return lines
