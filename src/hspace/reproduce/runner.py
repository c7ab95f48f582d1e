"""The runner of `hspace reproduce`: configuration, cached sections, timings, named held-out seed ranges,
and the shared building blocks the claims measure with (the bank, held-out samples, supervised
directions, classifier scores of edits).

A claim is a module with ``NAME``, ``measure(run) -> dict`` (its numbers and intervals), ``judge(result) ->
dict`` (its ``verdict``, with its thresholds) and ``render(result, config) -> list[str]`` (Markdown);
``CLAIMS`` in ``__init__`` lists them in order.
Sections are cached as JSON (``sections/NAME.json``), so an interrupted run resumes where it stopped.

Verdicts are three-way and have a margin: a claim **holds** where the 95% interval of what it measures
(``mean_interval`` over samples: normal; ``share_interval`` of a share: Wilson; ``cluster_bootstrap`` over
repeated draws) lies on the right side of its threshold, **fails** where it lies on the wrong side, and is
**undecided** where it straddles it, so that a difference smaller than the sampling noise (Asyrp 0.00003
stronger on 6 samples) decides nothing. A claim's ``judge(result)`` reads the verdict off the measured
numbers and is applied at every run, cached section or not: a verdict's rule is never part of what is
measured. The thresholds are the ones stated before measuring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ..domains import get_domain
from ..errors import HspaceError
from ..files import read_json, save_image, write_json

logger = logging.getLogger(__name__)

DOMAIN = get_domain("toyfaces")  # the claims are measured with its classifier and attributes
BINARY, CONTINUOUS = DOMAIN.binary, DOMAIN.continuous
TABLE_ATTRIBUTES = ("smile", "eyes_open", "glasses", "hat", "hair_color")
HELD_OUT = 50_000  # seeds of held-out test samples start here (the bank uses 0 .. n-1)
# Each claim draws its held-out samples from its own range of seeds (HELD_OUT + offset on).
SEED_RANGES = {"pca_vs_random": 0, "table1": 0, "fig8": 10_000, "jacobian": 20_000, "swap": 30_000, "asyrp": 40_000, "sequential": 45_000}


@dataclass
class Config:
    steps: int
    bank_n: int
    pca_k: int
    pca_samples: int
    pca_scales: list[float]
    pca_large_scales: list[float]
    table_n: int
    table_k: int
    table_scale: float
    fig8_bank_n: int
    fig8_pairs: list[int]
    fig8_test: int
    jacobian_transfer: int
    jacobian_found_at: list[str]  # which of "early", "middle", "late" to find directions at
    jacobian_max_iter: int
    swap_pairs: int
    asyrp_samples: int
    asyrp_scales: list[float]
    sequential_samples: int
    eta: float = 1.0
    batch_size: int = 64
    # A claim's own counts (``metadata["section"]``) key only its own section: adding one measures that claim again,
    # not the banks and the other claims.
    pca_random_per_pc: int = field(default=3, metadata={"section": "pca_vs_random"})  # random directions per PC (R = k x this)
    fig8_edit_draws: int = field(default=20, metadata={"section": "fig8"})  # draws of the pairs (and test samples) for the edits
    fig8_draw_samples: int = field(default=10, metadata={"section": "fig8"})  # held-out samples edited per draw

    def key(self, section: str | None = None) -> dict:
        """What a cached stage was measured with: the shared counts, and ``section``'s own."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("section") in (None, section)}


QUICK = Config(
    steps=8, bank_n=64, pca_k=3, pca_samples=6, pca_scales=[-3.0, 3.0], pca_large_scales=[8.0], table_n=16, table_k=8, table_scale=1.0,
    fig8_bank_n=64, fig8_pairs=[1, 2, 4, 8], fig8_test=8, jacobian_transfer=3, jacobian_found_at=["late"], jacobian_max_iter=10, swap_pairs=8,
    asyrp_samples=6, asyrp_scales=[0.5, 1.0], sequential_samples=6, pca_random_per_pc=2, fig8_edit_draws=5, fig8_draw_samples=4,
)
FULL = Config(
    steps=20, bank_n=400, pca_k=8, pca_samples=32, pca_scales=[-3.0, 3.0], pca_large_scales=[6.0, 10.0], table_n=200, table_k=40,
    table_scale=1.0, fig8_bank_n=1100, fig8_pairs=[1, 2, 5, 10, 20, 50, 100, 200], fig8_test=50,
    jacobian_transfer=20, jacobian_found_at=["early", "middle", "late"], jacobian_max_iter=30, swap_pairs=50, asyrp_samples=30, asyrp_scales=[0.25, 0.5, 1.0], sequential_samples=30,
)


def change(before: dict, after: dict, name: str) -> torch.Tensor:
    """Per-sample signed change of an attribute (the domain's rule: the background hue the shorter way round)."""
    return DOMAIN.change(name, before[name], after[name])


def confidence(scores: dict) -> torch.Tensor:
    """Mean over binary attributes of max(p, 1 - p): how clearly the classifier reads the image."""
    return torch.stack([torch.maximum(scores[n], 1 - scores[n]) for n in BINARY]).mean(0)


Z = 1.959964  # the 95% point of the normal distribution


def mean_interval(values: torch.Tensor) -> tuple[float, float]:
    """The normal 95% interval of the mean of per-sample ``values`` (the whole line for fewer than 2)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(values) < 2:
        return (-float("inf"), float("inf"))
    mean, se = float(values.mean()), float(values.std() / len(values) ** 0.5)
    return (mean - Z * se, mean + Z * se)


def share_interval(successes: float, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of a share of ``successes`` in ``n`` trials (honest at small n and at 0 or 1)."""
    if n < 1:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * (p * (1 - p) / n + Z * Z / (4 * n * n)) ** 0.5 / (1 + Z * Z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def cluster_bootstrap(groups: list, resamples: int = 2000, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """The mean of every value in ``groups`` (one list of values per independent draw) and its percentile 95%
    bootstrap interval, resampling whole draws with replacement (so that what varies between draws and what
    varies within one both count)."""
    sums = torch.tensor([float(sum(g)) for g in groups], dtype=torch.float64)
    counts = torch.tensor([float(len(g)) for g in groups], dtype=torch.float64)
    mean = float(sums.sum() / counts.sum())
    if len(groups) < 2:
        return mean, (-float("inf"), float("inf"))
    pick = torch.randint(len(groups), (resamples, len(groups)), generator=torch.Generator().manual_seed(seed))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return mean, (low, high)


def verdict(holds: bool, fails: bool, intervals: dict | None = None, **thresholds) -> dict:
    """A claim's verdict: ``state`` "holds" (its intervals clear the thresholds), "fails" (they lie on the wrong
    side) or "undecided"; the intervals it was judged by, and the thresholds."""
    if holds and fails:
        raise ValueError("a verdict cannot both hold and fail")
    state = "holds" if holds else "fails" if fails else "undecided"
    return {"state": state, "holds": state == "holds", "intervals": intervals or {}, "thresholds": thresholds}


# The sample counts each claim's intervals are over (what ``decide_at`` scales): held-out samples, pairs or draws.
SAMPLES = {"pca_vs_random": "pca_samples", "table1": "table_n", "fig8": "fig8_edit_draws", "jacobian": "jacobian_transfer",
           "swap": "swap_pairs", "asyrp": "asyrp_samples", "sequential": "sequential_samples"}
GROWTH = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100, 150, 250, 400, 650, 1000)  # the factors decide_at tries
COUNTS = ("pairs_that_differ", "samples")  # counts that judges turn into Wilson intervals


def with_more_samples(result: dict, factor: float) -> dict:
    """``result`` as ``factor`` times the samples would measure it if every mean stayed where it is: each interval
    (a value under a key that names an interval) narrowed about its centre by 1 / sqrt(factor), each standard error
    too, and the counts judges build Wilson intervals from (``COUNTS``) multiplied. The verdict is left out."""
    narrow = factor ** -0.5

    def walk(value, key: str, inside: bool):
        inside = inside or "interval" in key
        if isinstance(value, dict):
            return {k: walk(v, str(k), inside) for k, v in value.items() if k != "verdict"}
        if key == "standard_error":
            return _scaled(value, narrow)
        if isinstance(value, (list, tuple)):
            pair = len(value) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < float("inf") for x in value)
            if inside and pair:
                centre, half = (value[0] + value[1]) / 2, (value[1] - value[0]) / 2
                return [centre - narrow * half, centre + narrow * half]
            return [walk(v, key, inside) for v in value]
        if key in COUNTS and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value * factor
        return value

    return walk(result, "", False)


def _scaled(value, by: float):
    return [_scaled(v, by) for v in value] if isinstance(value, (list, tuple)) else value * by


def decide_at(result: dict, judge: Callable[[dict], dict], samples: str | None = None) -> dict | None:
    """A power analysis of an undecided verdict from its own measured spread: the smallest factor in ``GROWTH`` by
    which more samples (``samples``: the config field they are counted by) would decide it, and which way, if the means
    stayed where they are and every interval narrowed as 1 / sqrt(n). None when the verdict is decided already;
    ``factor`` None when even 1000 times the samples would not (a mean on its threshold, or an interval that more of
    these samples cannot narrow)."""
    if judge(result)["state"] != "undecided":
        return None
    for factor in GROWTH:
        state = judge(with_more_samples(result, factor))["state"]
        if state != "undecided":
            found = {"factor": factor, "state": state}
            break
    else:
        found = {"factor": None, "state": "undecided", "tried_up_to": GROWTH[-1]}
    now = result.get("config", {}).get(samples) if samples else None
    if now is not None:
        found["samples"] = {"field": samples, "now": now, "needed": None if found["factor"] is None else math.ceil(now * found["factor"])}
    return found


def judged(name: str, result: dict, judge: Callable[[dict], dict]) -> dict:
    """``judge(result)``, with the power analysis of an undecided verdict (``decide_at``) as its ``decide_at``."""
    found = judge(result)
    more = decide_at(result, judge, SAMPLES.get(name))
    return found if more is None else {**found, "decide_at": more}


def combine(*verdicts: dict, intervals: dict | None = None, **thresholds) -> dict:
    """The verdict of a claim with several parts: it holds when every part holds, fails when any part fails."""
    states = [v["state"] for v in verdicts]
    return verdict(all(s == "holds" for s in states), any(s == "fails" for s in states), intervals, **thresholds)


class Run:
    """One reproduction: the engine, the config, the output folder, and the cached building blocks."""

    def __init__(self, out: str | Path, config: Config, engine=None, any_model: bool = False, render_only: bool = False):
        from ..engine import Engine

        self.out = Path(out)
        self.config = config
        self.render_only = render_only  # read every section from its cache, measure none (the verdicts judged again)
        self.engine = engine or Engine.load("toyfaces")
        if self.engine.name not in DOMAIN.models:
            if not any_model:
                raise HspaceError(f"reproduce measures with the toy-faces classifier; the engine is {self.engine.name!r} "
                                  f"(valid: {', '.join(DOMAIN.models)}; any_model=True, on the command line --any-model, measures another model with it anyway)")
            logger.warning("%r is not a toy-faces model: its images are scored by the toy-faces classifier and parts, so the "
                           "numbers test that the study runs, not what the model's h does", self.engine.name)
        self.classify = DOMAIN.scorer()
        # what a cached section was measured with: the counts and the process (clipping is part of the spec)
        self.key = {**config.key(), "spec": self.engine.spec.to_dict()}
        self.timings: dict[str, float] = {}
        (self.out / "sections").mkdir(parents=True, exist_ok=True)
        (self.out / "figures").mkdir(exist_ok=True)
        self._cache: dict = {}

    def section(self, name: str, compute: Callable[["Run"], dict], version: int | None = None, judge: Callable[[dict], dict] | None = None) -> dict:
        """A cached section: computed once, then read from sections/NAME.json (resume after interruption). The key is
        the shared counts, the section's own (``Config.key``) and the claim's ``version`` where it has one (a claim
        that measures more is measured again). ``judge(result)`` gives the verdict, at every call: it is stored in
        the section (its checksum follows), and a changed rule never measures again."""
        path = self.out / "sections" / f"{name}.json"
        saved = _read_cached(path)
        key = {**self.key, **self.config.key(name)}
        key = key if version is None else {**key, "version": version}
        if saved is not None and saved.get("config") == key and saved.get("checksum") == _checksum(saved):
            self.timings[name] = saved["seconds"]
            return self._judged(path, saved, judge)
        if self.render_only and saved is not None and saved.get("checksum") == _checksum(saved) and _older_record(saved.get("config"), key):
            # measured before the spec recorded some of today's fields (their values then unknown): judged as it is
            logger.warning("section %s was measured before the spec recorded %s; its numbers are judged as they are", name,
                           ", ".join(sorted(set(key["spec"]) - set(saved["config"]["spec"]))))
            self.timings[name] = saved["seconds"]
            return self._judged(path, saved, judge)
        if self.render_only:
            why = ("there is none" if saved is None else "it was measured with other settings" if saved.get("config") != key
                   else "it was changed since it was measured (its checksum does not match)")
            raise HspaceError(f"--render-only measures nothing, but section {name} of {str(self.out)!r} cannot be read: {why}; run `hspace reproduce` without --render-only to measure it")
        if saved is not None and saved.get("config") == key:
            logger.warning("section %s was changed since it was measured (its checksum does not match): measuring it again", name)
        logger.info("measuring %s", name)
        start = time.perf_counter()
        result = compute(self)
        result["seconds"] = time.perf_counter() - start
        result["config"] = key
        result = json.loads(json.dumps(result))  # as it reads back (tuples become lists)
        result["checksum"] = _checksum(result)
        write_json(path, result)  # before judging: a judge that fails loses nothing measured
        self.timings[name] = result["seconds"]
        return self._judged(path, result, judge)

    @staticmethod
    def _judged(path: Path, result: dict, judge) -> dict:
        """``result`` with its verdict by ``judge``, written back where that changed it."""
        if judge is not None:
            found = json.loads(json.dumps(judged(path.stem, result, judge)))
            if found != result.get("verdict"):
                result["verdict"] = found
                result["checksum"] = _checksum(result)
                write_json(path, result)
        return result

    def figure(self, image, name: str) -> str:
        save_image(image, self.out / "figures" / name)
        return f"figures/{name}"

    def plot(self, draw: Callable, name: str, size=(5, 3.5)) -> str:
        """A matplotlib figure drawn by ``draw(fig)`` into figures/NAME (a ``Figure`` of its own: no pyplot, no backend
        chosen for the process)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=size)
        draw(fig)
        fig.tight_layout()
        fig.savefig(self.out / "figures" / name, dpi=100)
        return f"figures/{name}"

    @property
    def bank(self):
        """The bank (eta of the config), drawn (or resumed) and annotated once; its time is cached like a section's."""
        if "bank" not in self._cache:
            self._cache["bank"] = self._bank("bank", self.config.bank_n, self.config.eta)
        return self._cache["bank"]

    @property
    def ddim_bank(self):
        """A bank drawn under DDIM (eta 0), for the claims the paper measures that way (Fig. 8)."""
        if "ddim_bank" not in self._cache:
            self._cache["ddim_bank"] = self._bank("ddim_bank", self.config.fig8_bank_n, 0.0)
        return self._cache["ddim_bank"]

    def _bank(self, name: str, n: int, eta: float):
        from ..bank import build_bank

        bank = self.cached_bank(name)
        if bank is not None:
            return bank
        logger.info("drawing %s", name)
        start = time.perf_counter()
        bank = build_bank(self.out / name, self.engine, n, self.config.steps, eta, batch_size=self.config.batch_size)
        return self.adopt_bank(name, bank, time.perf_counter() - start)

    def cached_bank(self, name: str = "bank"):
        """The bank ``name`` as an earlier run of this config drew and annotated it, or None."""
        from ..bank import Bank

        record, path = self.out / "sections" / f"{name}.json", self.out / name
        saved = _read_cached(record)
        if saved is not None and (path / "bank.json").is_file():
            bank = Bank.open(path)
            if saved.get("config") == self.key and isinstance(saved.get("seconds"), (int, float)) and bank.complete and bank.scores_path("classifier").is_file():
                self.timings[name] = saved["seconds"]
                self._cache[name] = bank
                return bank
        return None

    def adopt_bank(self, name: str, bank, seconds: float):
        """``bank`` (drawn at ``self.out / name`` by this run's engine and config) annotated and recorded as the run's
        ``name``; ``seconds``: what drawing it took (its share, where one draw filled several banks)."""
        from ..directions.supervised import annotate_bank

        start = time.perf_counter()
        annotate_bank(bank, self.classify)
        self.timings[name] = seconds + time.perf_counter() - start
        write_json(self.out / "sections" / f"{name}.json", {"seconds": self.timings[name], "config": self.key})
        self._cache[name] = bank
        return bank

    def test_samples(self, n: int, claim: str, eta: float | None = None):
        """n held-out samples from the claim's own seed range (``SEED_RANGES``), under the config's eta or ``eta``."""
        eta = self.config.eta if eta is None else eta
        key = ("test", n, claim, eta)
        if key not in self._cache:
            first = HELD_OUT + SEED_RANGES[claim]
            self._cache[key] = self.engine.sample(range(first, first + n), self.config.steps, eta, batch_size=self.config.batch_size)
        return self._cache[key]

    def supervised(self, disentangled: bool) -> dict:
        """eq. 10 directions of the table's attributes from the bank (top/bottom k), or eq. 11 of them."""
        from ..directions.disentangle import disentangle_each
        from ..directions.supervised import direction_from_scores

        if "supervised" not in self._cache:
            self._cache["supervised"] = {a: direction_from_scores(self.bank, a, self.config.table_k) for a in TABLE_ATTRIBUTES}
        sup = self._cache["supervised"]
        return disentangle_each(sup) if disentangled else sup

    def edit_scores(self, trajectory, directions, scales, eps_pass: str = "edited"):
        """Classifier scores of every (direction, scale, sample): dict name -> [D, S, B]; and the images."""
        images = self.engine.edit(trajectory, directions, scales, eps_pass=eps_pass, batch_size=self.config.batch_size).images
        D, S, B = images.shape[:3]
        scores = self.classify(images.reshape(D * S * B, *images.shape[3:]))
        return {k: v.reshape(D, S, B) for k, v in scores.items()}, images


def _older_record(saved: dict | None, key: dict) -> bool:
    """``saved`` equals ``key`` but for spec fields it predates (``key``'s spec has fields that ``saved``'s lacks)."""
    if not saved or not isinstance(saved.get("spec"), dict) or set(saved) != set(key):
        return False
    spec = {k: v for k, v in key["spec"].items() if k in saved["spec"]}
    return set(saved["spec"]) < set(key["spec"]) and {**saved, "spec": spec} == {**key, "spec": spec} and saved["spec"] == spec


def _checksum(section: dict) -> str:
    """SHA-256 of a section's JSON without its checksum: a hand-edited or damaged cache is measured again,
    never reported as measured."""
    body = {k: v for k, v in section.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_cached(path: Path) -> dict | None:
    """A cached section, or None where there is none or it cannot be read (it is then measured again)."""
    if not path.is_file():
        return None
    try:
        return read_json(path, "cached section")
    except HspaceError as e:
        logger.warning("measuring again: %s", e)
        return None


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def holds(result: dict) -> str:
    """The verdict as the report writes it: **holds**, **fails** or **undecided**; an undecided one with the samples
    that would decide it (``decide_at``)."""
    return f"**{result['verdict']['state']}**" + deciding(result["verdict"])


def deciding(verdict: dict) -> str:
    """What would decide an undecided verdict, as the report writes it (empty for a decided one)."""
    more = verdict.get("decide_at")
    if not more:
        return ""
    counted = more.get("samples")
    if more["factor"] is None:
        return f" (not even {more['tried_up_to']}x the samples would decide it: the measured means sit on, or within a hair of, the threshold)"
    field = f": {counted['field']} {counted['now']} -> {counted['needed']}" if counted else ""
    return f" (about {more['factor']:g}x the samples would decide it, as {more['state']}, if the means stay{field})"


def deciding_short(more: dict | None) -> str:
    """``deciding`` for a table cell, from a verdict's ``decide_at``: the factor of samples that would decide it, and
    which way (empty for a decided verdict)."""
    if not more:
        return ""
    return f" (>{more['tried_up_to']}x n)" if more["factor"] is None else f" ({more['factor']:g}x n: {more['state']})"
