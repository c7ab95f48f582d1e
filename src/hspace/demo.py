"""The main job: sample the bundled model, swap h between samples, edit by vector arithmetic, by
classifier-annotated attribute directions, by the top PCA directions against random ones, and by
Jacobian directions of one sample. Attribute figures need a domain (``hspace.domains``) for the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .directions.disentangle import disentangle
from .directions.jacobian import jacobian_directions
from .directions.pca import pca, random_directions
from .directions.supervised import mean_difference, top_bottom
from .domains import Domain, domain_of
from .engine import Engine
from .files import save_image, write_text
from .images import labelled_grid
from .inversion import invert
from .loading import DEFAULT_MODEL

logger = logging.getLogger(__name__)

POOL = 64  # samples with h for the PCA and the annotation
PCS = 6
JACOBIAN_K = 2
SCALES = [-1.0, -0.5, 0.0, 0.5, 1.0]
ATTRIBUTES = ("smile", "glasses", "hat", "eyes_open")


@dataclass
class Demo:
    """What the figures share: the engine, its domain (or None), the output folder and the figures so far."""

    engine: Engine
    domain: Domain | None
    out: Path
    steps: int
    figures: list[tuple[str, str]] = field(default_factory=list)
    edits: dict = field(default_factory=dict)  # some figures' images, for the tests

    def save(self, image, name: str, caption: str) -> None:
        logger.info("writing %s", name)
        save_image(image, self.out / name)
        self.figures.append((name, caption))


def _edit_grid(edits: torch.Tensor, directions, seeds, columns):
    """Edits [D, S, B, ...] as one grid: a row per (direction, sample), a column per scale."""
    rows = [f"{d.name} / seed {s}" for d in directions for s in seeds]
    return labelled_grid(edits.transpose(1, 2).reshape(-1, edits.shape[1], *edits.shape[3:]), rows, columns)


def run_demo(out: str | Path, model: str | None = None, steps: int = 50, device: str | None = None) -> list[Path]:
    """Write the demo figures into ``out``; returns their paths (an index.md first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine.load(model or DEFAULT_MODEL, device=device)
    demo = Demo(engine, domain_of(engine.spec, required=False), out, steps)
    ddpm = _samples_and_swap(demo)
    targets = ddpm[[2, 3, 4, 5]]
    pool = engine.sample(range(1000, 1000 + POOL), steps, eta=1.0)  # serves the PCA and the annotation
    scores = None if demo.domain is None else demo.domain.scorer()(pool.images)
    direction = _arithmetic(demo, ddpm, pool, scores, targets)
    if scores is not None and set(ATTRIBUTES) <= set(scores):
        _attributes(demo, pool, scores, targets)
    _pca(demo, pool, targets)
    _jacobian(demo, targets)
    single = engine.edit(targets[[0]], direction, SCALES).images[0, :, 0]
    asyrp = engine.edit(targets[[0]], direction, SCALES, eps_pass="clean").images[0, :, 0]
    demo.save(
        labelled_grid(torch.stack([single, asyrp]), ["single pass", "Asyrp"], [f"{s:g}" for s in SCALES]),
        "asyrp.png",
        "Injection into P_t and D_t (one denoiser pass per step, the paper's choice) vs Asyrp (P_t only, two passes).",
    )
    if model in (None, DEFAULT_MODEL):
        _text_to_image(demo, device)
    index = out / "index.md"
    lines = [f"# hspace demo: {engine.name}", ""]
    for name, caption in demo.figures:
        lines += [f"## {name}", "", caption, "", f"![{name}]({name})", ""]
    write_text(index, "\n".join(lines))
    return [index] + [out / name for name, _ in demo.figures]


TEXT_STEPS = 25  # the text-to-image section's DDIM steps (at most; fewer when the demo runs fewer)
TEXT_GUIDANCE = 5.0


def _text_to_image(demo: Demo, device) -> None:
    """The text-to-image section, on the bundled toysd (a Stable Diffusion pipeline of toy faces): samples that follow
    their prompts, a prompt-pair slider for smile (no training) applied under several prompts, and its card."""
    from .card import card, write_card
    from .directions.prompts import prompt_direction
    from .loading import TOYSD_FOLDER
    from .toyfaces.captions import caption

    if not (TOYSD_FOLDER / "model_index.json").is_file():
        logger.warning("the bundled toysd is missing from %s: the demo's text-to-image section is skipped", TOYSD_FOLDER)
        return
    engine, steps = Engine.load("toysd", device=device, guidance=TEXT_GUIDANCE), min(demo.steps, TEXT_STEPS)
    prompts = [caption({"smile": False}), caption({"hat": True}), caption({"glasses": True, "hair_color": 0.1}),
               caption({"eyes_open": False, "skin_tone": 0.9}), caption({"yaw": -0.8, "background": 0.66})]
    seeds = list(range(20, 20 + len(prompts)))
    drawn = engine.sample(seeds, steps, 0.0, prompts=prompts)
    demo.save(labelled_grid(drawn.images[None], [""], prompts, min_cell=64), "toysd_prompts.png",
              f"toysd (`--model toysd`, guidance {TEXT_GUIDANCE:g}, DDIM {steps} steps): one sample per prompt, captions by "
              "`hspace.toyfaces.captions.caption`.")
    slider = prompt_direction(engine, [(caption({"smile": True}), caption({"smile": False}))], 32, steps, 0.0, name="smiling")
    scales = [0.0, 1.0, 2.0]
    edits = engine.edit(drawn, slider, scales).images[0]  # [S, B, ...]
    demo.edits["toysd_slider"] = edits
    demo.save(labelled_grid(edits.transpose(0, 1), prompts, [f"{s:g}" for s in scales], min_cell=64), "toysd_slider.png",
              "A prompt-pair slider ('a face, smiling' | 'a face, neutral', h of 32 seeds, `hspace prompt-direction`) "
              "added under each prompt, even 'a face, neutral': scales 0, 1, 2.")
    result = card(slider, engine, n=32, num_steps=steps, eta=0.0)
    write_card(result, slider, demo.out / "toysd_card")
    name, text = demo.figures[-1]
    demo.figures[-1] = (name, text + " Its card (dose-response, side effects, flip rates on 32 held-out samples): "
                        "[toysd_card/card.md](toysd_card/card.md).")


def _samples_and_swap(demo: Demo):
    engine, steps, seeds = demo.engine, demo.steps, list(range(8))
    ddpm, ddim = engine.sample(seeds, steps, eta=1.0), engine.sample(seeds, steps, eta=0.0)
    demo.save(
        labelled_grid(torch.stack([ddpm.images, ddim.images]), ["eta=1", "eta=0"], [f"seed {s}" for s in seeds]),
        "samples.png",
        f"Samples of {engine.name} ({steps} steps): " + ("flow matching, stochastic (eta=1) and the Euler ODE (eta=0)"
                                                         if engine.schedule(steps).process == "flow" else "DDPM (eta=1) and DDIM (eta=0)") + " from the same seeds.",
    )
    a, b = ddpm[[0, 1, 2, 3]], ddpm[[4, 5, 6, 7]]
    swapped = engine.swap(a, b)
    demo.save(
        labelled_grid(torch.stack([a.images, b.images, swapped.images], 1), [f"{i}<-h{j}" for i, j in zip(a.seeds, b.seeds)], ["sample", "h donor", "swapped"]),
        "swap.png",
        "h-swap (paper Fig. 3): each sample replayed with its own x_T and z but the donor's h_t at every step.",
    )
    return ddpm


def _arithmetic(demo: Demo, ddpm, pool, scores, targets):
    """Vector arithmetic (Fig. 4): h of one sample minus h of another; with a domain, the sample its
    classifier finds most smiling minus the least smiling one."""
    plus, minus, label = ddpm[[0]], ddpm[[1]], "h(seed 0) - h(seed 1)"
    if scores is not None and "smile" in scores:
        top, bottom = top_bottom(scores["smile"], 1)
        plus, minus, label = pool[top], pool[bottom], "h(smiling) - h(not smiling)"
    direction = mean_difference(plus, minus, name=label)
    edits = demo.engine.edit(targets, direction, SCALES).images[0]
    demo.save(
        labelled_grid(edits.transpose(0, 1), [f"seed {s}" for s in targets.seeds], [f"{s:g}" for s in SCALES]),
        "arithmetic.png",
        f"Vector arithmetic (paper Fig. 4): {label} added to other samples at scales gamma (one batched replay).",
    )
    return direction


def _attributes(demo: Demo, pool, scores, targets) -> None:
    """Directions from classifier annotation (eq. 10), disentangled (eq. 11), and a real image edited."""
    from .directions.regression import Regression

    engine = demo.engine
    directions = []
    for name in ATTRIBUTES:
        top, bottom = top_bottom(scores[name], 8)
        directions.append(mean_difference(pool[top], pool[bottom], name=name))
    # The report's best method (docs/reproduce.md: the least entangled): h regressed on all the attributes at once,
    # each partial effect rescaled to the norm of the eq. 10 direction of its attribute, so that only the direction differs.
    fit = Regression(list(ATTRIBUTES))
    fit.update(pool.h, torch.stack([scores[name].double() for name in ATTRIBUTES], 1))
    both = []
    for d, plain in zip(fit.directions(engine.spec, timesteps=pool.timesteps), directions):
        both += [plain.renamed(f"{plain.name} (eq. 10)"), d.renamed(f"{plain.name} (regression)", norm_of=plain)]
    demo.save(
        _edit_grid(engine.edit(targets[[0]], both, SCALES).images, both, targets.seeds[:1], [f"{s:g}" for s in SCALES]),
        "attributes.png",
        "Attribute directions from classifier annotation, two ways, at the same norm: eq. 10 (the paper's: mean h of the 8 "
        f"samples the classifier scores highest minus the 8 lowest, of {POOL}) and regression (h of all {POOL} regressed on the "
        "four attributes at once: each direction is one attribute's partial effect, the others held fixed; the report's "
        "least entangled method: in its Table 1 the mean change of the other attributes is 39% below eq. 10's, "
        "docs/reproduce.md). The training data correlates smile with hat, which eq. 10's smile direction carries along.",
    )
    # The smile direction also adds hats (the training data correlates them); removing its projection onto
    # the other attribute directions keeps the smile only.
    by_name = {d.name: d for d in directions}
    clean = disentangle(by_name["smile"], [d for d in directions if d.name != "smile"])
    demo.save(
        _edit_grid(engine.edit(targets[[0, 1, 2]], [by_name["smile"], clean], SCALES).images, [by_name["smile"], clean], targets.seeds[:3], [f"{s:g}" for s in SCALES]),
        "disentangled.png",
        "Disentanglement (paper eq. 11): the smile direction above, and the same with its projection onto the "
        "glasses, hat and eyes directions removed (over the concatenated h_T..h_1).",
    )
    if demo.domain.render is None:
        return
    # A real image (drawn by the domain's renderer, not by the model) through edit-friendly DDPM inversion.
    face = demo.domain.render([20_000_000], engine.image_size[0])[0]  # (images, labels, masks)
    inverted = invert(engine, face, demo.steps, 1.0)
    edits = engine.edit(inverted, [by_name["glasses"], by_name["hat"], clean], SCALES).images
    error = float((inverted.images - face).abs().max())
    grid = torch.cat([torch.stack([face[0], inverted.images[0], face[0], inverted.images[0], face[0]])[None], edits[:, :, 0]])
    demo.save(
        labelled_grid(grid, ["image / reconstruction", "glasses", "hat", "smile (disentangled)"], [f"{s:g}" for s in SCALES]),
        "inversion.png",
        "A rendered face (not a model sample) inverted by edit-friendly DDPM inversion (eta 1; max |reconstruction "
        f"error| {error:.2g}), then edited by the attribute directions. First row: the image and its reconstruction.",
    )


def _pca(demo: Demo, pool, targets) -> None:
    """Global directions (Sec. 4.1, Fig. 5-6): per-timestep PCA of the pool's h, and random directions with
    the same per-timestep norm. Scales in units of sigma (std of the data along the component)."""
    engine = demo.engine
    found = pca(pool, PCS)
    pcs = found.directions_for(engine.spec)
    randoms = random_directions(found, 2, seed=0, spec=engine.spec)
    sigmas = [-3.0, -1.5, 0.0, 1.5, 3.0]
    edits = engine.edit(targets[[0, 1]], pcs + randoms, sigmas).images
    ratios = ", ".join(f"pc{j + 1} {100 * float(r):.1f}%" for j, r in enumerate(found.variance_ratio.mean(1)))
    demo.save(
        _edit_grid(edits, pcs + randoms, targets.seeds[:2], [f"{s:g} sigma" for s in sigmas]),
        "pca.png",
        f"Top {PCS} principal components of h per timestep over {POOL} samples (paper Sec. 4.1, Fig. 5) and two random "
        f"directions of the same per-timestep norm (Fig. 6), at -3..3 sigma. Variance explained (mean over steps): {ratios}.",
    )


def _jacobian(demo: Demo, targets) -> None:
    """Image-specific directions (Sec. 4.2, Fig. 7) of one sample at 70% of the process (where the toy
    model's edits are most local), restricted to parts of the output where the domain has them."""
    engine, steps = demo.engine, demo.steps
    source, at = targets[[0]], (7 * steps) // 10
    domain = demo.domain
    regions = ["eyes", "mouth"] if domain is not None and {"eyes", "mouth"} <= set(domain.parts) else [None]
    jacobian, lines = [], []
    for region in regions:
        mask = None if region is None else domain.part_mask(region, engine.sample_shape[-1])
        found = jacobian_directions(engine, source, 0, at, k=JACOBIAN_K, mask=mask, mask_name=region, generator=torch.Generator().manual_seed(0))[0]
        for d in found.directions:
            d.meta["name"] = f"{region or 'j'}{d.meta['params']['index'] + 1}"
        jacobian += found.directions
        values = ", ".join(f"{float(v):.3g}" for v in found.singular_values)
        lines.append(f"{region or 'whole image'}: singular values {values}, {found.svd.iterations[0]} iterations")
    gammas = [-0.3, -0.15, 0.0, 0.15, 0.3]
    others = targets[[0, 1, 2]]  # the source sample, then two others (transfer)
    demo.save(
        _edit_grid(engine.edit(others, jacobian, gammas).images, jacobian, others.seeds, [f"{g:g}" for g in gammas]),
        "jacobian.png",
        f"Jacobian directions of seed {source.seeds[0]} at step {at} of {steps} (paper Alg. 1, Fig. 7), "
        + ("restricted to the eyes and the mouth region; " if regions != [None] else "")
        + "applied at every step with gamma in units of ||h_t||, to the source (first row of each) and transferred to "
        f"two other samples. {'; '.join(lines)}.",
    )
