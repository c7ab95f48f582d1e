"""`hspace reproduce`: the paper's claims as numbers on the bundled toy-faces model, written as a report.

Every section states the paper's claim, what we measured and whether it holds. Sections are cached as
JSON in the output folder, so an interrupted run resumes where it stopped (the bank resumes too).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import HspaceError
from .images import labelled_grid

logger = logging.getLogger(__name__)
from .domains import get_domain

DOMAIN = get_domain("toyfaces")  # the claims are measured with its classifier and attributes
BINARY, CONTINUOUS = DOMAIN.binary, DOMAIN.continuous

TABLE_ATTRIBUTES = ("smile", "eyes_open", "glasses", "hat", "hair_color")
HELD_OUT = 50_000  # seeds of held-out test samples start here (the bank uses 0 .. n-1)


@dataclass
class Config:
    steps: int
    bank_n: int
    pca_k: int
    pca_samples: int
    pca_scales: list[float]
    table_n: int
    table_k: int
    table_scale: float
    fig8_attribute: str
    fig8_pairs: list[int]
    fig8_test: int
    jacobian_k: int
    jacobian_transfer: int
    swap_pairs: int
    asyrp_samples: int
    asyrp_scales: list[float]
    sequential_samples: int
    eta: float = 1.0
    batch_size: int = 64


QUICK = Config(
    steps=8, bank_n=64, pca_k=3, pca_samples=6, pca_scales=[-3.0, 3.0], table_n=16, table_k=8, table_scale=1.0,
    fig8_attribute="glasses", fig8_pairs=[1, 4, 16], fig8_test=8, jacobian_k=2, jacobian_transfer=3, swap_pairs=8,
    asyrp_samples=6, asyrp_scales=[0.5, 1.0], sequential_samples=6,
)
FULL = Config(
    steps=25, bank_n=400, pca_k=10, pca_samples=32, pca_scales=[-3.0, -1.5, 1.5, 3.0], table_n=200, table_k=40,
    table_scale=1.0, fig8_attribute="glasses", fig8_pairs=[1, 2, 5, 10, 20, 50, 100], fig8_test=50, jacobian_k=3,
    jacobian_transfer=20, swap_pairs=50, asyrp_samples=30, asyrp_scales=[0.25, 0.5, 1.0], sequential_samples=30,
)


def _change(before: dict, after: dict, name: str) -> torch.Tensor:
    """Per-sample signed change of an attribute (background hue: the shorter way round the circle)."""
    d = after[name] - before[name]
    if name == "background":
        d = torch.remainder(d + 0.5, 1.0) - 0.5
    return d


def _confidence(scores: dict) -> torch.Tensor:
    """Mean over binary attributes of max(p, 1 - p): how clearly the classifier reads the image."""
    return torch.stack([torch.maximum(scores[n], 1 - scores[n]) for n in BINARY]).mean(0)


class Reproduction:
    def __init__(self, out: str | Path, config: Config, engine=None):
        from .engine import Engine

        self.out = Path(out)
        self.config = config
        self.engine = engine or Engine.load("toyfaces")
        if self.engine.name not in DOMAIN.models:
            raise HspaceError(f"reproduce measures with the toy-faces classifier; the engine is {self.engine.name!r}")
        self.classify = DOMAIN.scorer()
        self.timings: dict[str, float] = {}
        (self.out / "sections").mkdir(parents=True, exist_ok=True)
        (self.out / "figures").mkdir(exist_ok=True)
        self._cache: dict = {}

    # ------------------------------------------------------------------ helpers

    def run_stage(self, desc: str, fn: Callable):
        logger.info(desc)  # each stage draws its own progress bar
        return fn(None)

    def section(self, name: str, compute: Callable[[], dict]) -> dict:
        """A cached section: computed once, then read from sections/NAME.json (resume after interruption)."""
        path = self.out / "sections" / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("config") == asdict(self.config):
                self.timings[name] = saved["seconds"]
                return saved
        start = time.perf_counter()
        result = compute()
        result["seconds"] = time.perf_counter() - start
        result["config"] = asdict(self.config)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        self.timings[name] = result["seconds"]
        return result

    def figure(self, image, name: str) -> str:
        image.save(self.out / "figures" / name)
        return f"figures/{name}"

    @property
    def bank(self):
        """The bank, drawn (or resumed) and annotated once; its drawing time is cached like a section's."""
        if "bank" not in self._cache:
            from .bank import Bank, build_bank

            c = self.config
            record = self.out / "sections" / "bank.json"
            path = self.out / "bank"
            if record.is_file() and (path / "bank.json").is_file():
                saved, bank = json.loads(record.read_text()), Bank.open(path)
                if saved.get("config") == asdict(c) and bank.complete and bank.scores_path("classifier").is_file():
                    self._cache["bank"] = bank
                    self.timings["bank"] = saved["seconds"]
                    return bank
            start = time.perf_counter()
            bank = self.run_stage(
                "bank", lambda cb: build_bank(path, self.engine, c.bank_n, c.steps, c.eta, batch_size=c.batch_size, callback=cb)
            )
            from .directions.supervised import annotate_bank

            annotate_bank(bank)
            self._cache["bank"] = bank
            self.timings["bank"] = time.perf_counter() - start
            record.write_text(json.dumps({"seconds": self.timings["bank"], "config": asdict(c)}, indent=1))
        return self._cache["bank"]

    def test_samples(self, n: int, offset: int = 0):
        key = ("test", n, offset)
        if key not in self._cache:
            c = self.config
            seeds = list(range(HELD_OUT + offset, HELD_OUT + offset + n))
            self._cache[key] = self.run_stage(
                "held-out samples", lambda cb: self.engine.sample(seeds, c.steps, c.eta, batch_size=c.batch_size, callback=cb)
            )
        return self._cache[key]

    def supervised(self, disentangled: bool) -> dict:
        from .directions.disentangle import disentangle_each
        from .directions.supervised import direction_from_scores

        if "supervised" not in self._cache:
            self._cache["supervised"] = {a: direction_from_scores(self.bank, a, self.config.table_k) for a in TABLE_ATTRIBUTES}
        sup = self._cache["supervised"]
        return disentangle_each(sup) if disentangled else sup

    def edit_scores(self, trajectory, directions, scales, asyrp: bool = False):
        """Classifier scores of every (direction, scale, sample): dict name -> [D, S, B]."""
        images = self.run_stage(
            "edits", lambda cb: self.engine.edit(trajectory, directions, scales, eps_pass="clean" if asyrp else "edited", batch_size=self.config.batch_size, callback=cb)
        )
        D, S, B = images.shape[:3]
        scores = self.classify(images.reshape(D * S * B, *images.shape[3:]))
        return {k: v.reshape(D, S, B) for k, v in scores.items()}, images

    # ------------------------------------------------------------------ sections

    def pca_vs_random(self) -> dict:
        from .directions.pca import pca_per_timestep, random_directions

        c = self.config
        pca = pca_per_timestep(self.bank.h_chunks(), c.pca_k, expected_n=self.bank.n)
        pcs = pca.directions(self.engine.spec)
        randoms = random_directions(pca, c.pca_k, seed=0)
        test = self.test_samples(c.pca_samples)
        before = self.classify(test.images)
        scores, images = self.edit_scores(test, pcs + randoms, c.pca_scales)
        rows = []
        for d, direction in enumerate(pcs + randoms):
            row = {"name": direction.name, "scales": {}}
            for s, scale in enumerate(c.pca_scales):
                after = {k: v[d, s] for k, v in scores.items()}
                row["scales"][f"{scale:g}"] = {
                    "mean_abs_change": {a: float(_change(before, after, a).abs().mean()) for a in BINARY + CONTINUOUS},
                    "mean_change": {a: float(_change(before, after, a).mean()) for a in BINARY + CONTINUOUS},
                    "confidence": float(_confidence(after).mean()),
                }
            rows.append(row)
        top = max(c.pca_scales)
        strongest = {r["name"]: max(max(r["scales"][f"{s:g}"]["mean_abs_change"][a] for a in BINARY) for s in (top, -top)) for r in rows}
        grid = self.figure(
            labelled_grid(images[:, :, 0], [d.name for d in pcs + randoms], [f"{s:g} sigma" for s in c.pca_scales]), "pca_vs_random.png"
        )
        self._plot_pca(rows, c.pca_scales, float(_confidence(before).mean()))
        return {
            "rows": rows,
            "strongest_binary_change_at_max_scale": strongest,
            "variance_ratio": [float(v) for v in pca.variance_ratio.mean(1)],
            "confidence_unedited": float(_confidence(before).mean()),
            "grid": grid,
        }

    def _plot_pca(self, rows, scales, confidence0) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        xs = [0.0] + sorted(scales)
        for r in rows:
            style = "-" if r["name"].startswith("pc") else "--"
            change = [0.0] + [max(r["scales"][f"{s:g}"]["mean_abs_change"][a] for a in BINARY) for s in sorted(scales)]
            conf = [confidence0] + [r["scales"][f"{s:g}"]["confidence"] for s in sorted(scales)]
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            axes[0].plot([xs[i] for i in order], [change[i] for i in order], style, label=r["name"])
            axes[1].plot([xs[i] for i in order], [conf[i] for i in order], style, label=r["name"])
        axes[0].set(xlabel="scale (sigma)", ylabel="largest mean |change| of a binary attribute", title="attribute change")
        axes[1].set(xlabel="scale (sigma)", ylabel="classifier confidence", title="image quality (confidence)")
        axes[0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(self.out / "figures" / "pca_vs_random_plot.png", dpi=100)
        plt.close(fig)

    def table1(self) -> dict:
        c = self.config
        test = self.test_samples(c.table_n)
        before = self.classify(test.images)
        result = {}
        for label in ("supervised", "disentangled"):
            dirs = self.supervised(label == "disentangled")
            scores, _ = self.edit_scores(test, [dirs[a] for a in TABLE_ATTRIBUTES], [c.table_scale])
            matrix = []
            for d, _a in enumerate(TABLE_ATTRIBUTES):
                after = {k: v[d, 0] for k, v in scores.items()}
                matrix.append([float(_change(before, after, b).mean()) for b in TABLE_ATTRIBUTES])
            off = [abs(matrix[i][j]) for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
            result[label] = {
                "matrix": matrix,
                "own_is_strongest": [max(range(len(row)), key=lambda j: abs(row[j])) == i for i, row in enumerate(matrix)],
                "mean_off_diagonal": sum(off) / len(off),
            }
        return result

    def fig8(self) -> dict:
        from .directions.supervised import bank_difference, edit_x_T, h_difference
        from .trajectory import seeded_noise

        c = self.config
        bank, attr = self.bank, c.fig8_attribute
        scores = bank.scores("classifier")[attr]
        positives = (scores > 0.5).nonzero()[:, 0].tolist()
        negatives = (scores <= 0.5).nonzero()[:, 0].tolist()
        generator = torch.Generator().manual_seed(0)
        positives = [positives[i] for i in torch.randperm(len(positives), generator=generator).tolist()]
        negatives = [negatives[i] for i in torch.randperm(len(negatives), generator=generator).tolist()]
        pool = self.test_samples(c.fig8_test * 3, offset=10_000)
        lacking = (self.classify(pool.images)[attr] <= 0.5).nonzero()[:, 0].tolist()[: c.fig8_test]
        test = pool[lacking]
        rows = []
        for n in c.fig8_pairs:
            if n > min(len(positives), len(negatives)):
                break
            pos, neg = positives[:n], negatives[:n]
            h_dir = bank_difference(bank, pos, neg, attr)
            x_T = lambda idx: torch.stack([seeded_noise(bank.seeds[i], self.engine.sample_shape, c.steps)[0] for i in idx])  # noqa: E731
            x_delta = h_difference(x_T(pos)[:, None], x_T(neg)[:, None])[0].float()  # eq. 10 in x_T (x_T_difference)
            h_images = self.engine.edit(test, h_dir, [1.0], batch_size=c.batch_size)[0, 0]
            x_images = edit_x_T(self.engine, test, x_delta, [1.0], batch_size=c.batch_size)[0]
            rows.append({
                "pairs": n,
                "h_success": float((self.classify(h_images)[attr] > 0.5).float().mean()),
                "x_T_success": float((self.classify(x_images)[attr] > 0.5).float().mean()),
            })
        self._plot_fig8(rows, attr)
        return {"attribute": attr, "test_samples": len(lacking), "rows": rows}

    def _plot_fig8(self, rows, attr) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["pairs"] for r in rows], [r["h_success"] for r in rows], "o-", label="h-space")
        ax.plot([r["pairs"] for r in rows], [r["x_T_success"] for r in rows], "s--", label="x_T")
        ax.set(xscale="log", xlabel="labelled pairs n", ylabel=f"share gaining {attr}", ylim=(-0.02, 1.02))
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "figures" / "fig8_h_vs_xT.png", dpi=100)
        plt.close(fig)

    def jacobian(self) -> dict:
        from .directions.jacobian import jacobian_directions

        c = self.config
        samples = self.test_samples(c.jacobian_transfer + 1, offset=20_000)
        source = samples[[0]]
        at = (7 * c.steps) // 10
        rows, grids = [], []
        for part in ("eyes", "mouth"):
            mask = DOMAIN.part_mask(part, self.engine.sample_shape[-1])
            found = self.run_stage(
                f"jacobian {part}",
                lambda cb, mask=mask: jacobian_directions(self.engine, source, 0, at, k=c.jacobian_k, mask=mask, mask_name=part, generator=torch.Generator().manual_seed(0)),
            )[0]
            images = self.engine.edit(samples, found.directions, [-0.3, 0.3], batch_size=c.batch_size)
            change = (images - samples.images[None, None]).abs().sum(dim=3)  # [D, S, B, H, W]
            original = samples.images[None, None].expand(images.shape[0], 1, *samples.images.shape)
            shown = torch.cat([images[:, :1], original, images[:, 1:]], dim=1)  # -0.3, unedited, +0.3
            inside = (change * mask).sum(dim=(-1, -2)) / change.sum(dim=(-1, -2)).clamp_min(1e-12)  # [D, S, B]
            for i in range(c.jacobian_k):
                rows.append({
                    "mask": part, "index": i, "singular_value": float(found.singular_values[i]),
                    "inside_source": float(inside[i, :, 0].mean()), "inside_transfer": float(inside[i, :, 1:].mean()),
                })
            grids.append(shown[:, :, :4])
        figure = torch.cat([g.permute(0, 2, 1, 3, 4, 5).reshape(-1, 3, *g.shape[3:]) for g in grids])
        names = [f"{p}{i + 1} / {'source' if b == 0 else 'transfer'}" for p in ("eyes", "mouth") for i in range(c.jacobian_k) for b in range(min(4, len(samples)))]
        grid = self.figure(labelled_grid(figure, names, ["-0.3", "0", "+0.3"]), "jacobian.png")
        return {"step": at, "rows": rows, "grid": grid}

    def swap(self) -> dict:
        c = self.config
        a = self.test_samples(2 * c.swap_pairs, offset=30_000)
        first, second = a[list(range(c.swap_pairs))], a[list(range(c.swap_pairs, 2 * c.swap_pairs))]
        swapped = self.run_stage("h-swap", lambda cb: self.engine.swap(first, second, batch_size=c.batch_size, callback=cb))
        s_noise, s_h, s_out = self.classify(first.images), self.classify(second.images), self.classify(swapped.images)
        result = {}
        for name in BINARY:
            differ = (s_noise[name] > 0.5) != (s_h[name] > 0.5)
            if not differ.any():
                continue
            follows_h = ((s_out[name] > 0.5) == (s_h[name] > 0.5)) & differ
            result[name] = {"pairs_that_differ": int(differ.sum()), "follows_h": float(follows_h.sum() / differ.sum())}
        for name in CONTINUOUS:
            d_h = _change(s_h, s_out, name).abs()
            d_noise = _change(s_noise, s_out, name).abs()
            result[name] = {"pairs_that_differ": c.swap_pairs, "follows_h": float((d_h < d_noise).float().mean())}
        grid = self.figure(labelled_grid(torch.stack([first.images[:6], second.images[:6], swapped.images[:6]], 1), [str(i) for i in range(min(6, c.swap_pairs))], ["noise of", "h of", "swapped"]), "swap.png")
        return {"attributes": result, "grid": grid}

    def asyrp(self) -> dict:
        c = self.config
        test = self.test_samples(c.asyrp_samples, offset=40_000)
        before = self.classify(test.images)
        direction = self.supervised(False)["smile"]
        rows = {}
        for mode in ("single", "asyrp"):
            scores, _ = self.edit_scores(test, [direction], c.asyrp_scales, asyrp=mode == "asyrp")
            rows[mode] = {f"{s:g}": float(_change(before, {k: v[0, i] for k, v in scores.items()}, "smile").mean()) for i, s in enumerate(c.asyrp_scales)}
        return {"direction": "smile (supervised)", "mean_smile_change": rows}

    def sequential(self) -> dict:
        c = self.config
        pool = self.test_samples(c.sequential_samples * 3, offset=45_000)
        s = self.classify(pool.images)
        lacking = ((s["smile"] <= 0.5) & (s["glasses"] <= 0.5) & (s["hat"] <= 0.5)).nonzero()[:, 0].tolist()[: c.sequential_samples]
        test = pool[lacking]
        dirs = self.supervised(True)
        steps = ["smile", "glasses", "hat"]
        combos = list(itertools.accumulate(dirs[name] for name in steps))
        scores, images = self.edit_scores(test, combos, [c.table_scale])
        rows = [{"after": "+".join(steps[: i + 1]), "present": {a: float((scores[a][i, 0] > 0.5).float().mean()) for a in steps}} for i in range(len(steps))]
        grid = self.figure(
            labelled_grid(torch.cat([test.images[:4, None], images[:, 0, :4].transpose(0, 1)], 1), [str(i) for i in range(min(4, len(lacking)))], ["original", "+smile", "+glasses", "+hat"]),
            "sequential.png",
        )
        return {"samples": len(lacking), "rows": rows, "grid": grid}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _holds(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


SECTIONS = ("pca_vs_random", "table1", "fig8", "jacobian", "swap", "asyrp", "sequential")


def run_reproduce(out: str | Path, quick: bool = False, engine=None) -> Path:
    """Measure every section (cached, resumable) and write ``out/report.md``; returns its path."""
    config = QUICK if quick else FULL
    r = Reproduction(out, config, engine)
    start = time.perf_counter()
    r.bank  # drawn (or resumed) and annotated first, so that its time is its own stage
    results = {name: r.section(name, getattr(r, name)) for name in SECTIONS}
    total = time.perf_counter() - start
    lines = [
        "# hspace reproduce: the paper's claims measured on the bundled toy-faces model",
        "",
        f"Mode: {'quick' if quick else 'full'}; {config.steps} generative steps, eta {config.eta:g}; bank of "
        f"{config.bank_n} samples (seeds 0..{config.bank_n - 1}), held-out samples from seed {HELD_OUT}. "
        "Attributes are read by the bundled classifier (binary: probability; hair colour: value in [0, 1]).",
        "",
    ]
    lines += _report_pca(results["pca_vs_random"], config)
    lines += _report_table1(results["table1"], config)
    lines += _report_fig8(results["fig8"])
    lines += _report_jacobian(results["jacobian"])
    lines += _report_swap(results["swap"])
    lines += _report_asyrp(results["asyrp"])
    lines += _report_sequential(results["sequential"])
    lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in r.timings.items()]
    lines += [f"| sum of stages | {sum(r.timings.values()):.1f} |", f"| this invocation (cached stages are not re-run) | {total:.1f} |", ""]
    report = Path(out) / "report.md"
    report.write_text("\n".join(lines))
    (Path(out) / "timings.json").write_text(json.dumps(r.timings, indent=1))
    return report


def _report_pca(res, config) -> list[str]:
    top = max(config.pca_scales)
    strongest = res["strongest_binary_change_at_max_scale"]
    pcs = {k: v for k, v in strongest.items() if k.startswith("pc")}
    rnd = {k: v for k, v in strongest.items() if k.startswith("random")}
    ok = min(pcs.values()) >= 0.3 and max(rnd.values()) <= 0.1
    lines = [
        "## PCA vs random directions (Sec. 4.1, Fig. 5-6)",
        "",
        "Claim: principal components of h are semantic edits; random directions of the same per-timestep norm change "
        "little at the same scale (and degrade the image at large scales).",
        "",
        f"Measured on {config.pca_samples} held-out samples: the largest mean |change| of a binary attribute's probability "
        f"at +-{top:g} sigma. Target: every PC >= 0.3, every random direction <= 0.1.",
        "",
        "| direction | largest binary change | |direction | largest binary change |",
        "|---|---|---|---|---|",
    ]
    names_pc, names_rnd = list(pcs), list(rnd)
    for i in range(max(len(names_pc), len(names_rnd))):
        a = f"{names_pc[i]} | {pcs[names_pc[i]]:.2f}" if i < len(names_pc) else " | "
        b = f"{names_rnd[i]} | {rnd[names_rnd[i]]:.2f}" if i < len(names_rnd) else " | "
        lines.append(f"| {a} | | {b} |")
    lines += ["", f"Result: PCs min {min(pcs.values()):.2f}, random max {max(rnd.values()):.2f}: {_holds(ok)}.", ""]
    lines += ["What each PC changes (Fig. 5): mean signed change at +" + f"{top:g} sigma (binary: probability; continuous: value).", ""]
    lines += ["| PC | " + " | ".join(BINARY + ("hair_color", "skin_tone", "yaw")) + " | confidence |", "|---" * (len(BINARY) + 5) + "|"]
    for row in res["rows"]:
        if not row["name"].startswith("pc"):
            continue
        m = row["scales"][f"{top:g}"]
        cells = " | ".join(f"{m['mean_change'][a]:+.2f}" for a in BINARY + ("hair_color", "skin_tone", "yaw"))
        lines.append(f"| {row['name']} | {cells} | {m['confidence']:.2f} |")
    lines += [
        "",
        f"Unedited confidence {res['confidence_unedited']:.2f}. Variance explained per PC (mean over steps): "
        + ", ".join(f"{100 * v:.1f}%" for v in res["variance_ratio"]),
        "",
        "![plot](figures/pca_vs_random_plot.png)",
        "",
        f"![grid]({res['grid']})",
        "",
    ]
    return lines


def _report_table1(res, config) -> list[str]:
    lines = [
        "## Effect matrix and disentanglement (Sec. 5, eq. 11, Table 1)",
        "",
        "Claim: supervised directions (eq. 10) are entangled with correlated attributes; removing their projection onto "
        "the other directions (eq. 11) leaves mostly the intended change.",
        "",
        f"Rows: directions (top {config.table_k} minus bottom {config.table_k} of the bank by the classifier), applied at "
        f"scale {config.table_scale:g} to {config.table_n} held-out samples. Columns: mean change of each attribute. "
        "The strongest effect per row is in bold. Target: after disentanglement every row's strongest effect is its own "
        "attribute, and the mean |off-diagonal| falls by >= 50%.",
        "",
    ]
    for label in ("supervised", "disentangled"):
        m = res[label]["matrix"]
        lines += [f"{label}:", "", "| direction | " + " | ".join(TABLE_ATTRIBUTES) + " |", "|---" * (len(TABLE_ATTRIBUTES) + 1) + "|"]
        for i, row in enumerate(m):
            best = max(range(len(row)), key=lambda j: abs(row[j]))
            cells = [f"**{v:+.2f}**" if j == best else f"{v:+.2f}" for j, v in enumerate(row)]
            lines.append(f"| {TABLE_ATTRIBUTES[i]} | " + " | ".join(cells) + " |")
        lines += ["", f"mean |off-diagonal| {res[label]['mean_off_diagonal']:.3f}", ""]
    before, after = res["supervised"]["mean_off_diagonal"], res["disentangled"]["mean_off_diagonal"]
    ok = all(res["disentangled"]["own_is_strongest"]) and after <= 0.5 * before
    fall = 1 - after / before if before else 0.0
    lines += [f"Result: own attribute strongest in {sum(res['disentangled']['own_is_strongest'])}/{len(TABLE_ATTRIBUTES)} rows after "
              f"disentanglement ({sum(res['supervised']['own_is_strongest'])}/{len(TABLE_ATTRIBUTES)} before); off-diagonal fell by "
              f"{100 * fall:.0f}%: {_holds(ok)}.", ""]
    return lines


def _report_fig8(res) -> list[str]:
    rows = res["rows"]
    lines = [
        "## h-space vs x_T (Fig. 8)",
        "",
        "Claim: a direction from a few labelled pairs edits reliably in h-space, while the same mean difference in x_T needs "
        "far more pairs.",
        "",
        f"Edit success: the share of {res['test_samples']} held-out samples without {res['attribute']} that have it after "
        "adding the mean difference of n positive and n negative bank samples (scale 1). Target: h reaches 90% with <= 10 "
        "pairs and needs >= 10x fewer pairs than x_T.",
        "",
        "| pairs | h-space | x_T |",
        "|---|---|---|",
    ]
    lines += [f"| {r['pairs']} | {_pct(r['h_success'])} | {_pct(r['x_T_success'])} |" for r in rows]
    first_h = next((r["pairs"] for r in rows if r["h_success"] >= 0.9), None)
    first_x = next((r["pairs"] for r in rows if r["x_T_success"] >= 0.9), None)
    ok = first_h is not None and first_h <= 10 and (first_x is None or first_x >= 10 * first_h)
    x_text = f"{first_x}" if first_x is not None else f"not within {rows[-1]['pairs'] if rows else 0}"
    lines += ["", f"Result: 90% reached with {first_h} pairs in h-space, {x_text} in x_T: {_holds(ok)}"
              + ("" if first_x is not None else " (x_T never reached 90%, so the ratio is at least the range tested)") + ".", "",
              "![fig8](figures/fig8_h_vs_xT.png)", ""]
    return lines


def _report_jacobian(res) -> list[str]:
    lines = [
        "## Jacobian directions are local and transfer (Sec. 4.2, Fig. 7)",
        "",
        "Claim: the top singular vectors of the Jacobian make localized changes, and the same direction makes a similar "
        "change in other samples.",
        "",
        f"Masked directions (eyes, mouth region) at step {res['step']}, applied at all steps at +-0.3 ||h_t||: the share of "
        "the pixel change inside the mask, on the source sample and on the transfer samples. Target: >= 70% for the top "
        "masked directions.",
        "",
        "| direction | singular value | inside (source) | inside (transfer) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['mask']}{r['index'] + 1} | {r['singular_value']:.3g} | {_pct(r['inside_source'])} | {_pct(r['inside_transfer'])} |" for r in res["rows"]]
    tops = [r for r in res["rows"] if r["index"] == 0]
    ok = all(r["inside_source"] >= 0.7 and r["inside_transfer"] >= 0.7 for r in tops)
    lines += ["", f"Result (top direction per mask): {_holds(ok)}.", "", f"![jacobian]({res['grid']})", ""]
    return lines


def _report_swap(res) -> list[str]:
    lines = [
        "## h-swap (Fig. 3)",
        "",
        "Claim: swapping h between samples carries the semantic content; the noise keeps the rest (e.g. the background).",
        "",
        "Share of swapped samples whose attribute matches the h donor rather than the noise donor (binary: among pairs "
        "that differ; continuous: closer to the h donor).",
        "",
        "| attribute | follows h | pairs |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {_pct(v['follows_h'])} | {v['pairs_that_differ']} |" for k, v in res["attributes"].items()]
    sem = [res["attributes"][k]["follows_h"] for k in BINARY if k in res["attributes"]]
    ok = bool(sem) and min(sem) >= 0.5
    lines += ["", f"Result: every binary attribute follows h in most pairs: {_holds(ok)}.", "", f"![swap]({res['grid']})", ""]
    return lines


def _report_asyrp(res) -> list[str]:
    rows = res["mean_smile_change"]
    lines = [
        "## Asyrp vs single-pass injection (SM A)",
        "",
        "Claim: Asyrp (delta-h into P_t only, two passes) amplifies an edit; the single pass reaches similar edits at a "
        "larger scale.",
        "",
        f"Mean change of smile probability, {res['direction']} direction:",
        "",
        "| scale | single pass | Asyrp |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {rows['single'][s]:+.2f} | {rows['asyrp'][s]:+.2f} |" for s in rows["single"]]
    amplifies = all(abs(rows["asyrp"][s]) >= abs(rows["single"][s]) for s in rows["single"])
    lines += ["", f"Result: Asyrp at least as strong at every scale: {_holds(amplifies)}.", ""]
    return lines


def _report_sequential(res) -> list[str]:
    lines = [
        "## Sequential edits (Fig. 11)",
        "",
        "Claim: directions add up: applying several in turn changes each attribute in turn.",
        "",
        f"{res['samples']} held-out samples with no smile, glasses or hat; disentangled directions added one after another. "
        "Share with each attribute present:",
        "",
        "| after | smile | glasses | hat |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['after']} | {_pct(r['present']['smile'])} | {_pct(r['present']['glasses'])} | {_pct(r['present']['hat'])} |" for r in res["rows"]]
    last = res["rows"][-1]["present"] if res["rows"] else {}
    ok = bool(last) and min(last.values()) >= 0.5
    lines += ["", f"Result: all three present in most samples at the end: {_holds(ok)}.", "", f"![sequential]({res['grid']})", ""]
    return lines
