"""Text edits compared on a text-to-image toy (``toysd``), with the classifier as ground truth (issue 41).

For each of smile, glasses, hat and eyes open, on ``n`` held-out seeds drawn under the base prompt ``"a face"`` (DDIM,
eta 0, so a seed fixes the sample) and, per attribute, on the samples that lack the attribute:

- **prompt edit**: the same seeds under the prompt that names the attribute ("a face, smiling");
- **prompt pair**: ``prompt_direction`` of ("a face, smiling" | "a face, neutral") over ``direction_n`` other seeds;
- **regression**: the conditional direction of the attribute (h regressed on every binary attribute's classifier
  score) from a bank of ``bank_n`` samples under captions drawn as in training;
- **PCA**: of the principal components of that bank, the one whose scores correlate most with the attribute (signed
  to raise it), scaled per timestep to the regression direction's norm;

each direction swept over ``SCALES``. Measured per sample: the attribute's flip (the share of samples without it that
gain it), side effects (the share of the other binary attributes whose label changes), the pixel change, and
**identity**: the mean pixel change outside the attribute's region (``render.region_mask``). A direction is read at
**matched identity**: the scale where its identity change equals the prompt edit's (interpolated on the sweep), so
every method changes the rest of the face equally and the flip rates compare. Intervals: percentile bootstrap over
the seeds (the matching redone in every resample). Then the prompt-pair direction under each guidance branch
(``guide_edit`` cond / uncond / both, swept over ``BRANCH_SCALES``), and, found under "a face", applied at its matched
scale under the ten ``TRANSFER`` prompts (on the first ``TRANSFER_SEEDS`` seeds) next to each prompt's own prompt edit.

Every sampled set is cached in ``out/sets`` and every direction in ``out/directions``: a rerun resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import HspaceError
from ..files import write_atomic, write_json
from .captions import caption
from .classifier import classify
from .render import BINARY, region_mask

ATTRIBUTES = ("smile", "glasses", "hat", "eyes_open")
REGION = {"smile": "mouth", "glasses": "glasses", "hat": "hat", "eyes_open": "eyes"}
SCALES = (0.5, 1.0, 2.0, 4.0)
BRANCH_SCALES = (1.0, 2.0)  # the guidance branches' sweep (each branch's own matched reading interpolates on it)
TRANSFER_SEEDS = 32  # the first of the held-out seeds, under each transfer prompt
BASE_PROMPT = caption({})
TRANSFER = (  # the attributes of the ten other prompts a direction found under "a face" is applied under
    {"hair_color": 0.1}, {"hair_color": 0.9}, {"skin_tone": 0.1}, {"skin_tone": 0.9}, {"yaw": -0.8}, {"yaw": 0.8},
    {"background": 0.0}, {"background": 0.66}, {"hair_color": 0.4, "skin_tone": 0.5, "yaw": 0.0},
    {"hair_color": 0.6, "background": 0.33, "yaw": -0.8},
)
SAME_AS_PROMPT_EDIT = 0.10  # "edits as well": the prompt pair's flip rate at most this much below the prompt edit's
METHODS = ("prompt_pair", "regression", "pca")
BRANCHES = ("both", "cond", "uncond")


class Study:
    """The cached sets and directions of one comparison run in ``out``."""

    def __init__(self, engine, out: str | Path, n: int, num_steps: int, bank_n: int, direction_n: int, first_seed: int, progress):
        if not engine.spec.conditional:
            raise HspaceError(f"{engine.name!r} is unconditional: the text-edit comparison needs a text-to-image toy such as toysd")
        self.engine, self.out, self.n, self.num_steps = engine, Path(out), n, num_steps
        self.bank_n, self.direction_n, self.first_seed, self.progress = bank_n, direction_n, first_seed, progress
        self._check_settings({"model": engine.spec.space.fingerprint, "guidance": engine.spec.guidance, "n": n, "num_steps": num_steps,
                              "bank_n": bank_n, "direction_n": direction_n, "first_seed": first_seed})
        (self.out / "sets").mkdir(parents=True, exist_ok=True)
        (self.out / "directions").mkdir(exist_ok=True)
        self.seeds = list(range(first_seed, first_seed + n))
        self._base = {}

    def _check_settings(self, settings: dict) -> None:
        """A work folder holds one comparison: resumed only under the settings it was started with."""
        path = self.out / "settings.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
            if differ:
                raise HspaceError(f"{str(self.out)!r} holds a comparison of other settings ({'; '.join(differ)}); give another --out or the same settings")
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)

    def base(self, prompt: str = BASE_PROMPT):
        """The trajectory of the held-out seeds under ``prompt`` (h not recorded) and its classifier scores."""
        if prompt not in self._base:
            trajectory = self.engine.sample(self.seeds_of(prompt), self.num_steps, 0.0, record_h=False, prompts=[prompt], progress=self.progress)
            self._base[prompt] = (trajectory, self.scores(f"base {prompt}", lambda: trajectory.images))
        return self._base[prompt]

    def seeds_of(self, prompt: str) -> list[int]:
        """The held-out seeds drawn under ``prompt``: all of them under the base prompt, the first TRANSFER_SEEDS under another."""
        return self.seeds if prompt == BASE_PROMPT else self.seeds[:TRANSFER_SEEDS]

    def _trajectory(self, engine, prompt: str, guide_edit: str):
        """The held-out seeds drawn by an engine that edits under another guidance branch (the same unedited samples:
        the branch is part of the engine that replays them)."""
        if (prompt, guide_edit) not in self._base:
            self._base[(prompt, guide_edit)] = engine.sample(self.seeds, self.num_steps, 0.0, record_h=False, progress=self.progress)
        return self._base[(prompt, guide_edit)]

    def scores(self, key: str, images_of) -> dict:
        """Classifier scores and pixel changes of a set of images, cached under ``key``."""
        path = self.out / "sets" / (_slug(key) + ".npz")
        if path.is_file():
            return dict(np.load(path))
        images = images_of()
        found = {k: v.numpy() for k, v in classify(images).items() if k in BINARY}
        found["images"] = images.numpy().astype(np.float16)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **found)

        write_atomic(path, write)  # a run killed mid-write leaves no half a set behind
        return found

    def direction(self, name: str, make):
        from ..directions.direction import Direction

        path = self.out / "directions" / f"{name}.safetensors"
        if path.is_file():
            return Direction.load(path)
        made = make()
        made.save(path)
        return made

    def edited(self, key: str, direction, scales, prompt: str = BASE_PROMPT, guide_edit: str = "both") -> list[dict]:
        """Scores of the held-out samples under ``prompt`` edited by ``direction`` at each scale."""
        engine = self.engine.conditioned(prompt=prompt, guide_edit=guide_edit)
        trajectory = self.base(prompt)[0] if guide_edit == "both" else self._trajectory(engine, prompt, guide_edit)
        found, missing = {}, []
        for s in scales:
            path = self.out / "sets" / (_slug(f"{key} {guide_edit} {prompt} x{s:g}") + ".npz")
            if path.is_file():
                found[s] = dict(np.load(path))
            else:
                missing.append(s)
        if missing:
            images = engine.edit(trajectory, direction, missing, units="raw", progress=self.progress).images[0]
            for s, im in zip(missing, images):
                found[s] = self.scores(f"{key} {guide_edit} {prompt} x{s:g}", lambda im=im: im)
        return [found[s] for s in scales]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:150]


def per_sample(base: dict, after: dict, attribute: str) -> dict[str, np.ndarray]:
    """Per held-out sample: the attribute gained, the share of other binary attributes changed, the pixel change and
    the pixel change outside the attribute's region (identity)."""
    images_before, images_after = base["images"].astype(np.float32), after["images"].astype(np.float32)
    outside = ~region_mask(REGION[attribute], images_before.shape[-1])
    change = np.abs(images_after - images_before).mean(1)  # [B, H, W]
    others = [b for b in BINARY if b != attribute]
    return {
        "flip": (after[attribute] > 0.5).astype(np.float64),
        "side": np.mean([(after[b] > 0.5) != (base[b] > 0.5) for b in others], axis=0),
        "pixel": change.mean((1, 2)),
        "identity": change[:, outside].mean(1),
    }


def matched(curves: list[dict], target: float, rows: np.ndarray, scales) -> dict:
    """A swept direction's measures at the scale where its mean identity change over ``rows`` equals ``target``
    (linear interpolation from scale 0, where nothing changes); ``reached`` False: read at the largest scale."""
    identity = np.array([0.0] + [c["identity"][rows].mean() for c in curves])
    grid = np.array([0.0, *scales])
    above = np.nonzero(identity >= target)[0]
    if len(above) == 0:
        k, w, reached = len(curves), 1.0, False
    else:
        k = int(above[0])
        w, reached = (target - identity[k - 1]) / max(identity[k] - identity[k - 1], 1e-12), True
    out = {"scale": float(grid[k - 1] + w * (grid[k] - grid[k - 1])), "reached": reached}
    for m in ("flip", "side", "pixel", "identity"):
        values = np.array([0.0 if m != "flip" else 0.0] + [c[m][rows].mean() for c in curves])
        out[m] = float(values[k - 1] + w * (values[k] - values[k - 1]))
    return out


def read_at_matched_identity(prompt_edit: dict, sweeps: dict[str, list[dict]], eligible: np.ndarray, scales, resamples: int = 1000) -> dict:
    """Every method's measures at the prompt edit's identity change, with percentile-bootstrap 95% intervals over the
    eligible seeds (the matching redone in each resample)."""
    rng = np.random.default_rng(0)

    def once(rows):
        target = prompt_edit["identity"][rows].mean()
        row = {"prompt_edit": {m: float(prompt_edit[m][rows].mean()) for m in ("flip", "side", "pixel", "identity")}}
        row["prompt_edit"].update(scale=None, reached=True)
        row.update({name: matched(curves, target, rows, scales) for name, curves in sweeps.items()})
        return row

    point = once(eligible)
    draws = [once(rng.choice(eligible, len(eligible))) for _ in range(resamples)]
    for name, row in point.items():
        for m in ("flip", "side", "pixel", "scale"):
            if row[m] is not None:
                values = [d[name][m] for d in draws]
                row[f"{m}_interval"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    # the difference prompt pair - prompt edit, per resample: what the verdict is judged by
    for m in ("flip", "side"):
        values = [d["prompt_pair"][m] - d["prompt_edit"][m] for d in draws] if "prompt_pair" in point else []
        if values:
            point[f"prompt_pair_minus_prompt_edit_{m}"] = {"value": point["prompt_pair"][m] - point["prompt_edit"][m],
                                                          "interval": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]}
    point["eligible"] = int(len(eligible))
    return point


def bank_directions(study: Study, batch_size: int) -> dict[str, dict]:
    """The regression direction of every binary attribute and the attribute's best-correlated principal component, from
    a bank of ``bank_n`` samples (seeds 900000 ..) under captions drawn as in training."""
    from ..bank import build_bank
    from ..directions.pca import pca
    from ..directions.regression import regression_directions
    from ..directions.supervised import annotate_bank
    from ..directions.direction import Direction

    rng = np.random.default_rng(41)
    prompts = [caption(_training_attributes(rng), rng) for _ in range(study.bank_n)]
    bank = build_bank(study.out / "bank", study.engine, study.bank_n, study.num_steps, 0.0, base_seed=900_000, batch_size=batch_size,
                      thumbnail_size=study.engine.image_size[0], progress=study.progress, prompts=prompts)
    if not bank.scores_path("classifier").is_file():
        from .domain import TOYFACES

        annotate_bank(bank, scorer=TOYFACES.scorer())  # the toy-faces classifier, whatever folder the model is loaded from
    regression = {d.name: d for d in regression_directions(bank, list(BINARY))}
    components = pca(bank, 8)
    labels = bank.scores("classifier")
    projections = torch.zeros(components.k, bank.n, dtype=torch.float64)
    offset = 0
    for chunk in bank.h_chunks()():
        centred = chunk.double() - components.mean.unsqueeze(0)
        projections[:, offset:offset + len(chunk)] = torch.einsum("ntd,ktd->kn", centred.flatten(2), components.components.double().flatten(2))
        offset += len(chunk)
    found = {}
    for a in ATTRIBUTES:
        reg = regression[a]
        y = labels[a].double()
        corr = torch.stack([torch.corrcoef(torch.stack([p, y]))[0, 1] for p in projections])
        k = int(corr.abs().argmax())
        norm = reg.delta.double().flatten(1).norm(dim=1) / components.components[k].double().flatten(1).norm(dim=1)
        delta = components.components[k].double() * (torch.sign(corr[k]) * norm).view(-1, *[1] * (components.components.ndim - 2))
        pc = Direction(delta.float(), meta={"name": f"pc{k + 1}-{a}", "method": "pca", "params": {"component": k, "correlation": float(corr[k])}},
                       spec=reg.spec, timesteps=reg.timesteps)
        found[a] = {"regression": reg, "pca": pc, "component": k, "correlation": float(corr[k])}
    return found


def _training_attributes(rng) -> dict:
    """Attributes of a random face of the training distribution (the renderer's own sampler)."""
    from .render import sample_attributes

    a = sample_attributes(rng)
    return {name: getattr(a, name) for name in ("smile", "eyes_open", "glasses", "hat", "hair_color", "skin_tone", "yaw", "background")}


def compare(engine, out: str | Path, *, n: int = 64, num_steps: int = 20, bank_n: int = 256, direction_n: int = 64,
            first_seed: int = 500_000, batch_size: int = 64, resamples: int = 1000, progress: bool | None = None) -> dict:
    """The whole comparison (module doc); returns the report (also ``out/comparison.json``)."""
    from ..directions.prompts import prompt_direction

    study = Study(engine, out, n, num_steps, bank_n, direction_n, first_seed, progress)
    found = bank_directions(study, batch_size)
    _, base = study.base()
    report = {"settings": {"n": n, "num_steps": num_steps, "eta": 0.0, "guidance": engine.spec.guidance, "bank_n": bank_n,
                           "direction_n": direction_n, "first_seed": first_seed, "scales": list(SCALES), "base_prompt": BASE_PROMPT},
              "attributes": {}}
    for a in ATTRIBUTES:
        plus, minus = caption({a: True}), caption({a: False})
        pair = study.direction(f"prompt_pair-{a}", lambda: prompt_direction(engine, [(plus, minus)], direction_n, num_steps, 0.0, base_seed=800_000,
                                                                             batch_size=batch_size, progress=progress))
        directions = {"prompt_pair": pair, "regression": found[a]["regression"], "pca": found[a]["pca"]}
        prompt_edit = per_sample(base, study.scores(f"prompt {plus}", lambda: engine.sample(study.seeds, num_steps, 0.0, record_h=False, prompts=[plus], progress=progress).images), a)
        eligible = np.nonzero(base[a] <= 0.5)[0]
        if len(eligible) < 2:
            raise HspaceError(f"only {len(eligible)} of the {n} samples under {BASE_PROMPT!r} lack {a}: raise n")
        sweeps = {name: [per_sample(base, s, a) for s in study.edited(f"{name} {a}", d, SCALES)] for name, d in directions.items()}
        row = read_at_matched_identity(prompt_edit, sweeps, eligible, SCALES, resamples)
        row["pca_component"] = {"index": found[a]["component"] + 1, "correlation": found[a]["correlation"]}
        branches = {b: [per_sample(base, s, a) for s in study.edited(f"prompt_pair {a}", pair, BRANCH_SCALES, guide_edit=b)] for b in BRANCHES}
        row["branches"] = read_at_matched_identity(prompt_edit, branches, eligible, BRANCH_SCALES, resamples)
        row["transfer"] = _transfer(study, a, pair, row["prompt_pair"]["scale"])
        row["verdict"] = _verdict(row)
        report["attributes"][a] = row
    report["verdict"] = _overall([r["verdict"] for r in report["attributes"].values()])
    (Path(out) / "comparison.json").write_text(json.dumps(report, indent=1))
    return report


def _transfer(study: Study, attribute: str, pair, scale: float) -> dict:
    """The prompt pair found under "a face", at its matched scale, applied under each of the ``TRANSFER`` prompts: its
    flip rate there next to that prompt's own prompt edit (the prompt with the attribute's phrase added)."""
    rows = {}
    scale = round(scale, 3)
    for attributes in TRANSFER:
        prompt = caption(attributes)
        _, base = study.base(prompt)
        eligible = base[attribute] <= 0.5
        if eligible.sum() == 0:
            continue
        edited = per_sample(base, study.edited(f"prompt_pair {attribute}", pair, [scale], prompt=prompt)[0], attribute)
        with_phrase = caption({**attributes, attribute: True})
        by_prompt = per_sample(base, study.scores(f"prompt {with_phrase}", lambda: study.engine.sample(
            study.seeds_of(prompt), study.num_steps, 0.0, record_h=False, prompts=[with_phrase], progress=study.progress).images), attribute)
        rows[prompt] = {"eligible": int(eligible.sum()), "direction_flip": float(edited["flip"][eligible].mean()),
                        "direction_side": float(edited["side"][eligible].mean()), "prompt_edit_flip": float(by_prompt["flip"][eligible].mean()),
                        "prompt_edit_side": float(by_prompt["side"][eligible].mean())}
    return {"scale": scale, "prompts": rows}


def _verdict(row: dict) -> dict:
    """"A prompt-pair direction edits as well as a prompt edit, with less change elsewhere", at matched identity: holds
    when its flip rate is at most SAME_AS_PROMPT_EDIT below the prompt edit's and its side effects are lower (both
    intervals of the differences clear); fails when either interval lies on the wrong side; else undecided."""
    from ..reproduce.runner import verdict

    flip, side = row["prompt_pair_minus_prompt_edit_flip"], row["prompt_pair_minus_prompt_edit_side"]
    holds = flip["interval"][0] >= -SAME_AS_PROMPT_EDIT and side["interval"][1] < 0
    fails = flip["interval"][1] < -SAME_AS_PROMPT_EDIT or side["interval"][0] > 0
    return verdict(holds, fails, {"flip_difference": flip["interval"], "side_difference": side["interval"]}, flip_margin=SAME_AS_PROMPT_EDIT)


def _overall(verdicts: list[dict]) -> dict:
    from ..reproduce.runner import combine

    return combine(*verdicts)


def markdown(report: dict) -> str:
    """The comparison tables of a report."""
    def cell(row, m, pct=True):
        v, iv = row[m], row.get(f"{m}_interval")
        f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.3f}")
        return f"{f(v)} [{f(iv[0])}, {f(iv[1])}]" if iv else f(v)

    s = report["settings"]
    lines = [f"Held-out: {s['n']} seeds from {s['first_seed']} under {s['base_prompt']!r}, DDIM {s['num_steps']} steps, eta 0, "
             f"guidance {s['guidance']}; directions swept over scales {', '.join(map(str, s['scales']))} and read at the prompt edit's "
             "identity change (mean |pixel change| outside the attribute's region); 95% bootstrap intervals over seeds.", ""]
    lines += ["| attribute | method | flip rate | side effects | pixel change | identity change | scale |", "|---|---|---|---|---|---|---|"]
    for a, row in report["attributes"].items():
        for name in ("prompt_edit", *METHODS):
            r = row[name]
            scale = "" if r["scale"] is None else f"{r['scale']:.2f}" + ("" if r["reached"] else " (max; not matched)")
            lines.append(f"| {a} (n = {row['eligible']}) | {name.replace('_', ' ')} | {cell(r, 'flip')} | {cell(r, 'side')} | {r['pixel']:.3f} | {r['identity']:.3f} | {scale} |")
    lines += ["", "Guidance branch of the prompt-pair direction (read at the same matched identity):", "",
              "| attribute | branch | flip rate | side effects | pixel change | scale |", "|---|---|---|---|---|---|"]
    for a, row in report["attributes"].items():
        for b in BRANCHES:
            r = row["branches"][b]
            lines.append(f"| {a} | {b} | {cell(r, 'flip')} | {cell(r, 'side')} | {r['pixel']:.3f} | {r['scale']:.2f}{'' if r['reached'] else ' (max)'} |")
    lines += ["", "Transfer: the prompt pair found under 'a face', at its matched scale, under ten other prompts (mean over them; "
              "per prompt in comparison.json):", "", "| attribute | direction flip | prompt edit flip | direction side | prompt edit side | prompts |", "|---|---|---|---|---|---|"]
    for a, row in report["attributes"].items():
        t = list(row["transfer"]["prompts"].values())
        mean = lambda k: 100 * float(np.mean([r[k] for r in t]))
        lines.append(f"| {a} | {mean('direction_flip'):.0f}% | {mean('prompt_edit_flip'):.0f}% | {mean('direction_side'):.0f}% | {mean('prompt_edit_side'):.0f}% | {len(t)} |")
    lines += ["", "Verdict, per attribute, on 'a prompt-pair direction edits as well as a prompt edit (flip rate at most "
              f"{100 * SAME_AS_PROMPT_EDIT:.0f} points lower), with less change elsewhere (fewer side effects)':", ""]
    for a, row in report["attributes"].items():
        v = row["verdict"]
        lines.append(f"- {a}: **{v['state']}** (flip difference {[round(100 * x, 1) for x in v['intervals']['flip_difference']]} points, "
                     f"side-effect difference {[round(100 * x, 1) for x in v['intervals']['side_difference']]} points)")
    lines.append(f"- all four: **{report['verdict']['state']}**")
    return "\n".join(lines) + "\n"
