"""Directions from prompt pairs: a training-free text slider (paper eq. 10 with paired samples).

Sample i (seed ``base_seed + i``) is drawn twice with the same x_T and z, once under the "plus" prompt and once
under the "minus" prompt of pair ``i mod P``; the direction is the mean over the n samples of the difference of
their h at every step:

    delta_t = (1/n) sum_i [ h_t(x_T^i, z^i | plus_i) - h_t(x_T^i, z^i | minus_i) ]

Pairing removes the sample-to-sample spread of h that an unpaired eq. 10 must average away, so a few dozen seeds
suffice; several pairs ("a smiling man | a man", "a smiling woman | a woman", ...) keep the direction from being
tied to one subject. The direction is a vector in h-space like any other (its spec names the model and the h
location only): it applies under any prompt, at any step count (resampled by timestep).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..errors import HspaceError
from ..validate import check_int
from ..progress import Meter
from .direction import Direction


def parse_pairs(lines: Sequence[str], where: str = "the pairs") -> list[tuple[str, str]]:
    """Pairs from lines "plus prompt | minus prompt" (blank lines and lines starting with # skipped)."""
    pairs = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split("|")
        if len(parts) != 2 or not parts[0].strip():
            raise HspaceError(f"{where}, line {number}: {text[:80]!r} is not a pair; valid: 'plus prompt | minus prompt' (one '|', "
                              "the minus side may be empty)")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise HspaceError(f"{where} hold(s) no pair; valid: lines 'plus prompt | minus prompt'")
    return pairs


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HspaceError(f"pairs file {str(path)!r} cannot be read as UTF-8 text: {getattr(e, 'strerror', None) or e}") from None
    return parse_pairs(lines, f"pairs file {str(path)!r}")


def prompt_direction(
    engine,
    pairs: Sequence[tuple[str, str]],
    n: int,
    num_steps: int = 50,
    eta: float | Sequence[float] = 1.0,
    *,
    base_seed: int = 0,
    name: str | None = None,
    batch_size: int = 32,
    callback: Callable | None = None,
    progress: bool | None = None,
) -> Direction:
    """The mean paired difference of h between the plus and the minus prompts over ``n`` seeds (module doc).

    ``pairs``: (plus, minus) prompts; sample i uses pair i mod P. Each batch runs the plus and the minus samples
    of up to ``batch_size // 2`` seeds through the denoiser together; h is summed in float64 as it comes, so
    memory does not grow with n."""
    if not engine.spec.conditional:
        raise HspaceError(f"{engine.name!r} is an unconditional model: a prompt-pair direction needs a text-conditioned one")
    check_int("n", n, 1, valid="a positive integer (the number of seeds)")
    check_int("batch_size", batch_size, 2, valid="an integer >= 2 (a plus and a minus sample per seed)")
    pairs = [tuple(p) for p in pairs] if isinstance(pairs, (list, tuple)) else pairs
    if not isinstance(pairs, list) or not pairs or not all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise HspaceError(f"pairs must be a non-empty list of (plus, minus) prompt pairs, got {str(pairs)[:80]}")
    plus = engine.fit_prompts([p for p, _ in pairs])
    minus = engine.fit_prompts([m for _, m in pairs])
    same = [i for i in range(len(pairs)) if plus[i] == minus[i]]
    if same:
        raise HspaceError(f"pair {same[0] + 1} has the same prompt on both sides ({plus[same[0]]!r}): its difference is zero")
    seeds = list(range(base_seed, base_seed + n))
    per_batch = max(1, batch_size // 2)
    total = None
    with Meter.job(callback, 2 * n * num_steps, progress, "prompt pairs") as meter:
        for start in range(0, n, per_batch):
            chunk = seeds[start : start + per_batch]
            which = [(start + j) % len(pairs) for j in range(len(chunk))]
            drawn = engine.sample(chunk + chunk, num_steps, eta, keep_noise=False, batch_size=2 * len(chunk), callback=meter,
                                  prompts=[plus[w] for w in which] + [minus[w] for w in which])
            difference = (drawn.h[: len(chunk)].double() - drawn.h[len(chunk) :].double()).sum(0)
            total = difference if total is None else total + difference
    params = {"pairs": [list(p) for p in zip(plus, minus)], "n": n, "base_seed": base_seed, "eta": drawn.eta.tolist()}
    label = name or _default_name(plus[0], minus[0])
    return Direction((total / n).float(), meta={"name": label, "method": "prompt_pair", "params": params}, spec=engine.spec,
                     timesteps=drawn.timesteps)


def _default_name(plus: str, minus: str) -> str:
    """The words of the plus prompt that the minus prompt lacks ("smiling" for "a smiling person" | "a person")."""
    extra = [w for w in plus.split() if w not in set(minus.split())]
    return "-".join(extra)[:40] or "prompt-pair"
