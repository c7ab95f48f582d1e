"""Procedural renderer of simple cartoon faces ("toy faces").

Every image is drawn from a small set of ground-truth attributes, so the
effect of an editing direction can be measured exactly: which attribute it
changes, and where in the image (per-part masks are rendered alongside).

Attributes
----------
Binary (``BINARY``):

* ``smile`` (local, mouth): a wide open grin curved up, versus a short,
  flat, slightly down-turned neutral mouth.
* ``eyes_open`` (local, eyes): round white eyes with dark pupils, versus
  closed eyes drawn as a thin dark arc.
* ``glasses`` (local, eyes region): two dark rims around the eyes, a bridge,
  short temple arms and faintly tinted lenses.
* ``hat`` (local, top of the head): a blue cap with a yellow band and a
  brim, covering the top of the head and the hair there.

Continuous (``CONTINUOUS``):

* ``hair_color`` in [0, 1]: along the palette black -> dark brown ->
  auburn -> blonde.
* ``skin_tone`` in [0, 1]: light -> dark.
* ``yaw`` in [-1, 1]: head turned left (negative) or right (positive); the
  facial features slide sideways and foreshorten, the face ellipse narrows,
  hair, ears and hat move the other way.  A global change of the whole head.
* ``background`` in [0, 1]: hue of the pastel background (1.0 is the same
  hue as 0.0).  A global change outside the head.

Nuisance factors (``NUISANCE``), drawn from the same per-seed generator but
not labels: ``face_scale`` (head size, 0.95 to 1.05 when sampled) and
``face_dy`` (vertical offset of the head as a fraction of the image size,
-0.02 to 0.02 when sampled).

Correlations in the training distribution
-----------------------------------------
``sample_attributes(rng, correlated=True)`` (the default, and what
``render_seed`` / ``render_batch`` use) draws two deliberately entangled
pairs, imitating the spurious correlations of real face datasets:

1. ``glasses`` depends on ``hair_color`` ("darker hair wears glasses more"):
   P(glasses | hair_color < 0.5) = 0.55 and P(glasses | hair_color >= 0.5)
   = 0.15, so the marginal P(glasses) = 0.35.
2. ``hat`` depends on ``smile``: P(hat | smile) = 0.6 and
   P(hat | no smile) = 0.2; with P(smile) = 0.5 the marginal P(hat) = 0.4.

Everything else is independent: P(smile) = 0.5, P(eyes_open) = 0.5, and
``hair_color``, ``skin_tone``, ``background`` ~ U[0, 1), ``yaw`` ~ U[-1, 1).
With ``correlated=False`` all attributes are independent with the *same
marginals* (P(glasses) = 0.35, P(hat) = 0.4).  Both modes consume the
generator identically, so for one seed the two modes differ only in the
``glasses`` and ``hat`` bits.

Masks
-----
``render`` returns one boolean mask per part in ``PARTS`` at the output
resolution.  A pixel is in a part's mask when that part covers at least
1/255 of it, so changing only that part changes no pixel outside its mask by
more than 1/255 (invisible in 8 bits).

* ``eyes`` / ``mouth``: a fixed region around both eyes / around the mouth,
  containing both variants (open and closed, smile and neutral), so it does
  not depend on the binary attribute and is comparable across samples.
* ``face``: the skin of the head (face, ears, nose and the features drawn
  on it) where not hidden by hair or hat.
* ``hair``: visible hair (behind the head and the fringe) not under the hat.
* ``glasses`` / ``hat``: where they are drawn; empty when absent.

Rendering is pure numpy: signed-distance shapes with analytic anti-aliasing,
evaluated on a 2x supersampled grid and box-downsampled, vectorised over a
batch of faces.  It is deterministic (only IEEE-exact pixel arithmetic), so a
face renders to the same pixels alone or inside a batch.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BINARY",
    "CONTINUOUS",
    "ATTRIBUTES",
    "NUISANCE",
    "PARTS",
    "MIN_SIZE",
    "MAX_SIZE",
    "P_SMILE",
    "P_EYES_OPEN",
    "P_GLASSES_DARK_HAIR",
    "P_GLASSES_LIGHT_HAIR",
    "DARK_HAIR_THRESHOLD",
    "P_GLASSES",
    "P_HAT_SMILE",
    "P_HAT_NO_SMILE",
    "P_HAT",
    "FaceAttributes",
    "sample_attributes",
    "render",
    "render_seed",
    "render_many",
    "render_batch",
    "region_mask",
]

BINARY: tuple[str, ...] = ("smile", "eyes_open", "glasses", "hat")
CONTINUOUS: tuple[str, ...] = ("hair_color", "skin_tone", "yaw", "background")
ATTRIBUTES: tuple[str, ...] = BINARY + CONTINUOUS
NUISANCE: tuple[str, ...] = ("face_scale", "face_dy")
PARTS: tuple[str, ...] = ("eyes", "mouth", "hair", "face", "glasses", "hat")

MIN_SIZE = 16
MAX_SIZE = 1024

# Sampling distribution (see the module docstring).
P_SMILE = 0.5
P_EYES_OPEN = 0.5
DARK_HAIR_THRESHOLD = 0.5
P_GLASSES_DARK_HAIR = 0.55
P_GLASSES_LIGHT_HAIR = 0.15
P_GLASSES = 0.5 * (P_GLASSES_DARK_HAIR + P_GLASSES_LIGHT_HAIR)  # marginal, 0.35
P_HAT_SMILE = 0.6
P_HAT_NO_SMILE = 0.2
P_HAT = P_SMILE * P_HAT_SMILE + (1 - P_SMILE) * P_HAT_NO_SMILE  # marginal, 0.4
FACE_SCALE_SAMPLE_RANGE = (0.95, 1.05)
FACE_DY_SAMPLE_RANGE = (-0.02, 0.02)

# Ranges accepted by FaceAttributes (name -> (low, high), inclusive).
_RANGES: dict[str, tuple[float, float]] = {
    "hair_color": (0.0, 1.0),
    "skin_tone": (0.0, 1.0),
    "yaw": (-1.0, 1.0),
    "background": (0.0, 1.0),
    "face_scale": (0.8, 1.2),
    "face_dy": (-0.05, 0.05),
}

_SUPERSAMPLE = 2
_CHUNK_PIXELS = 1 << 18  # supersampled pixels rendered together in one vectorised pass
_MASK_THRESHOLD = 1.0 / 255.0
_YAW_ANGLE = 0.55  # radians of head rotation at |yaw| = 1
_FEATURE_DEPTH = 0.9  # features lie on a cylinder of this fraction of the face radius

# Palettes (linear interpolation between evenly spaced stops).
_HAIR_STOPS = np.array(
    [
        [0.09, 0.07, 0.07],  # black
        [0.32, 0.19, 0.10],  # dark brown
        [0.66, 0.33, 0.13],  # auburn
        [0.95, 0.82, 0.44],  # blonde
    ]
)
_SKIN_STOPS = np.array(
    [
        [1.00, 0.87, 0.76],
        [0.90, 0.69, 0.53],
        [0.72, 0.50, 0.34],
        [0.48, 0.31, 0.20],
    ]
)
_WHITE = (0.98, 0.98, 0.98)
_DARK = (0.07, 0.05, 0.05)
_MOUTH = (0.32, 0.03, 0.07)
_TEETH = (0.97, 0.96, 0.92)
_FRAME = (0.04, 0.04, 0.06)
_LENS = (0.80, 0.92, 1.00)
_LENS_ALPHA = 0.3
_HAT = (0.16, 0.26, 0.78)
_HAT_BRIM = (0.10, 0.16, 0.52)
_HAT_BAND = (0.98, 0.80, 0.15)


def _palette(stops: np.ndarray, t: float) -> tuple[float, float, float]:
    """Colour at position ``t`` in [0, 1] along evenly spaced palette stops."""
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    c = stops[i] * (1.0 - f) + stops[i + 1] * f
    return (float(c[0]), float(c[1]), float(c[2]))


def _background_rgb(hue: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(hue % 1.0, 0.38, 0.93)


def _coerce_bool(name: str, value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Real) and value in (0, 1):  # e.g. labels from as_dict()
        return bool(value)
    raise ValueError(f"{name} must be a bool (or 0/1), got {value!r}")


def _coerce_float(name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    lo, hi = _RANGES[name]
    if not (math.isfinite(x) and lo <= x <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return x


@dataclass(frozen=True)
class FaceAttributes:
    """Ground-truth description of one toy face.

    Binary fields are bools; ``hair_color``, ``skin_tone`` and ``background``
    lie in [0, 1] and ``yaw`` in [-1, 1].  ``face_scale`` and ``face_dy`` are
    nuisance factors (not labels).  Invalid values raise ``ValueError``.
    """

    smile: bool
    eyes_open: bool
    glasses: bool
    hat: bool
    hair_color: float
    skin_tone: float
    yaw: float
    background: float
    face_scale: float = 1.0
    face_dy: float = 0.0

    def __post_init__(self) -> None:
        for name in BINARY:
            object.__setattr__(self, name, _coerce_bool(name, getattr(self, name)))
        for name in CONTINUOUS + NUISANCE:
            object.__setattr__(self, name, _coerce_float(name, getattr(self, name)))

    def as_dict(self) -> dict[str, float]:
        """The labels (``ATTRIBUTES``) as floats; binaries as 0.0 / 1.0."""
        return {name: float(getattr(self, name)) for name in ATTRIBUTES}

    def replace(self, **changes: object) -> FaceAttributes:
        """A copy with some fields changed (validated like the constructor)."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ValueError(
                f"unknown FaceAttributes field(s) {unknown}; valid fields are {sorted(valid)}"
            )
        return dataclasses.replace(self, **changes)


def sample_attributes(rng: np.random.Generator, correlated: bool = True) -> FaceAttributes:
    """Draw one face from the training distribution.

    With ``correlated=True`` glasses depend on hair colour and hat on smile
    (see the module docstring); with ``correlated=False`` every attribute is
    independent with the same marginals.  The generator is advanced by the
    same number of draws in both modes.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(correlated, (bool, np.bool_)):
        raise ValueError(f"correlated must be a bool, got {correlated!r}")
    hair_color = float(rng.random())
    skin_tone = float(rng.random())
    yaw = float(rng.uniform(-1.0, 1.0))
    background = float(rng.random())
    u_smile, u_eyes, u_glasses, u_hat = (float(u) for u in rng.random(4))
    face_scale = float(rng.uniform(*FACE_SCALE_SAMPLE_RANGE))
    face_dy = float(rng.uniform(*FACE_DY_SAMPLE_RANGE))

    smile = u_smile < P_SMILE
    eyes_open = u_eyes < P_EYES_OPEN
    if correlated:
        p_glasses = (
            P_GLASSES_DARK_HAIR if hair_color < DARK_HAIR_THRESHOLD else P_GLASSES_LIGHT_HAIR
        )
        p_hat = P_HAT_SMILE if smile else P_HAT_NO_SMILE
    else:
        p_glasses, p_hat = P_GLASSES, P_HAT
    return FaceAttributes(
        smile=smile,
        eyes_open=eyes_open,
        glasses=u_glasses < p_glasses,
        hat=u_hat < p_hat,
        hair_color=hair_color,
        skin_tone=skin_tone,
        yaw=yaw,
        background=background,
        face_scale=face_scale,
        face_dy=face_dy,
    )


# ---------------------------------------------------------------------------
# Geometry: per-face parameters (computed in Python floats), then vectorised
# signed distances on the supersampled grid.  Coordinates are fractions of the
# image size, x to the right and y downwards.


def _face_params(a: FaceAttributes) -> dict[str, float]:
    s = a.face_scale
    cx, cy = 0.5, 0.55 + a.face_dy
    ang = a.yaw * _YAW_ANGLE
    sa = math.sin(ang)
    rx0, ry = 0.27 * s, 0.33 * s
    rxf = rx0 * (1.0 - 0.15 * abs(a.yaw))  # the face narrows when turned
    p: dict[str, float] = {"cx": cx, "cy": cy, "frx": rxf, "fry": ry}

    # Eyes sit at +-0.52 rad on the head "cylinder": they slide with the yaw
    # and the far eye foreshortens.
    ey = cy - 0.04 * s
    for side, phi in (("l", -0.52), ("r", 0.52)):
        p["ex" + side] = cx + _FEATURE_DEPTH * rxf * math.sin(phi + ang)
        # width factor, 1 when facing the viewer, never below 0.55
        p["ef" + side] = max(0.55, math.cos(phi + ang) / math.cos(phi))
    p["ey"] = ey
    p["s"] = s

    p["nx"] = cx + rxf * sa  # the nose sticks out: slides further
    p["ny"] = cy + 0.06 * s
    # Mouth corners at +-0.45 rad on the same cylinder as the eyes.
    x_left = _FEATURE_DEPTH * rxf * math.sin(ang - 0.45)
    x_right = _FEATURE_DEPTH * rxf * math.sin(ang + 0.45)
    p["mx"] = cx + 0.5 * (x_left + x_right)
    p["mw"] = 0.5 * (x_right - x_left)  # half width of the grin
    p["my"] = cy + 0.15 * s

    ear_shift = -0.45 * rxf * sa  # the back of the head moves the other way
    p["earlx"] = cx - 0.97 * rxf + ear_shift
    p["earrx"] = cx + 0.97 * rxf + ear_shift
    p["eary"] = cy

    p["hcx"] = cx - 0.45 * rxf * sa
    p["hcy"] = cy - 0.05 * s
    p["hrx"] = rx0 * 1.28
    p["hry"] = ry * 1.06
    p["hbot"] = cy + 0.14 * s
    p["hlx"] = cx + 0.9 * rxf * sa  # centre of the fringe's hairline

    p["hat_y"] = cy - 0.19 * s
    p["dome_x"] = p["hcx"]
    p["brim_x"] = cx - 0.2 * rxf * sa
    return p


def _ellipse(
    X: np.ndarray, Y: np.ndarray, cx: np.ndarray, cy: np.ndarray, rx: np.ndarray, ry: np.ndarray
) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (negative inside)."""
    nx = (X - cx) / rx
    ny = (Y - cy) / ry
    f2 = nx * nx + ny * ny
    gx = nx / rx
    gy = ny / ry
    g2 = gx * gx + gy * gy
    ratio = np.sqrt(f2 / np.maximum(g2, np.float32(1e-12)))
    ratio = np.maximum(ratio, np.minimum(rx, ry))
    return (np.sqrt(f2) - np.float32(1.0)) * ratio


def _hcapsule(
    X: np.ndarray, Y: np.ndarray, x0: np.ndarray, x1: np.ndarray, y: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """Signed distance to a horizontal capsule from (x0, y) to (x1, y), radius r."""
    dx = np.maximum(np.maximum(x0 - X, X - x1), np.float32(0.0))
    dy = Y - y
    return np.sqrt(dx * dx + dy * dy) - r


def _curve_stroke(
    X: np.ndarray,
    Y: np.ndarray,
    cx: np.ndarray,
    y0: np.ndarray,
    half_w: np.ndarray,
    bend: np.ndarray,
    thick: np.ndarray,
) -> np.ndarray:
    """Stroke along y = y0 + bend * (1 - t^2), t = (x - cx) / half_w, |t| <= 1.

    ``bend > 0`` bows the middle downwards (a smile); ``bend < 0`` upwards.
    """
    t = (X - cx) / half_w
    yc = y0 + bend * (np.float32(1.0) - t * t)
    slope = np.float32(-2.0) * bend * t / half_w
    inv_norm = np.float32(1.0) / np.sqrt(np.float32(1.0) + slope * slope)
    d = np.abs(Y - yc) * inv_norm - thick * np.float32(0.5)
    # Round caps: distance to the end points beyond |t| > 1.
    dx_end = np.maximum(np.abs(X - cx) - half_w, np.float32(0.0))
    dy_end = Y - y0
    d_cap = np.sqrt(dx_end * dx_end + dy_end * dy_end) - thick * np.float32(0.5)
    return np.where(np.abs(t) <= 1.0, d, d_cap)


def _between_curves(
    X: np.ndarray,
    Y: np.ndarray,
    cx: np.ndarray,
    y0: np.ndarray,
    half_w: np.ndarray,
    bend_top: np.ndarray,
    bend_bot: np.ndarray,
) -> np.ndarray:
    """Region between y0 + bend_top*(1-t^2) and y0 + bend_bot*(1-t^2), |t| <= 1."""
    t = (X - cx) / half_w
    q = np.float32(1.0) - t * t
    ytop = y0 + bend_top * q
    ybot = y0 + bend_bot * q
    s_top = np.float32(-2.0) * bend_top * t / half_w
    s_bot = np.float32(-2.0) * bend_bot * t / half_w
    d_top = (ytop - Y) / np.sqrt(np.float32(1.0) + s_top * s_top)
    d_bot = (Y - ybot) / np.sqrt(np.float32(1.0) + s_bot * s_bot)
    d_side = np.abs(X - cx) - half_w
    return np.maximum(np.maximum(d_top, d_bot), d_side)


class _Grid:
    """The supersampled pixel grid of a batch of faces, and the per-face parameters as [B, 1, 1] columns."""

    def __init__(self, attrs: Sequence[FaceAttributes], size: int):
        f32 = np.float32
        self.attrs, self.size, self.B = attrs, size, len(attrs)
        self.n = n = size * _SUPERSAMPLE
        coords = ((np.arange(n, dtype=np.float64) + 0.5) / n).astype(f32)
        self.X = coords.reshape(1, 1, n)
        self.Y = coords.reshape(1, n, 1)
        self.inv_pw = f32(n)  # one supersampled pixel is 1/n
        self.params = [_face_params(a) for a in attrs]
        self.s = self.col("s")

    def col(self, key: str) -> np.ndarray:
        return np.array([p[key] for p in self.params], dtype=np.float32).reshape(self.B, 1, 1)

    def flag(self, name: str) -> np.ndarray:
        return np.array([getattr(a, name) for a in self.attrs], dtype=np.float32).reshape(self.B, 1, 1)

    def cover(self, d: np.ndarray) -> np.ndarray:
        """Coverage of a pixel by the shape whose signed distance is ``d``."""
        return np.clip(np.float32(0.5) - d * self.inv_pw, np.float32(0.0), np.float32(1.0))

    def rgb(self, colors: Sequence[Sequence[float]]) -> np.ndarray:
        return np.asarray(colors, dtype=np.float32).reshape(self.B, 3, 1, 1)


def _head(g: _Grid) -> dict[str, np.ndarray]:
    """Face, ears, nose, back hair and fringe: coverages, and the face outline's distance."""
    f32, X, Y, s, col = np.float32, g.X, g.Y, g.s, g.col
    cx, cy, frx, fry = col("cx"), col("cy"), col("frx"), col("fry")
    d_face_edge = _ellipse(X, Y, cx, cy, frx, fry)
    a_ears = g.cover(
        np.minimum(
            _ellipse(X, Y, col("earlx"), col("eary"), f32(0.055) * s, f32(0.08) * s),
            _ellipse(X, Y, col("earrx"), col("eary"), f32(0.055) * s, f32(0.08) * s),
        )
    )
    a_nose = g.cover(_ellipse(X, Y, col("nx"), col("ny"), f32(0.028) * s, f32(0.04) * s))
    d_back = np.maximum(_ellipse(X, Y, col("hcx"), col("hcy"), col("hrx"), col("hry")), Y - col("hbot"))
    # Fringe: the part of the face above a hairline that dips at the temples.
    t = (X - col("hlx")) / frx
    hl = cy - f32(0.21) * s + f32(0.11) * s * t * t
    hl_slope = f32(0.22) * s * t / frx
    d_hairline = (Y - hl) / np.sqrt(f32(1.0) + hl_slope * hl_slope)
    # The fringe reaches a little past the face outline (over the back hair,
    # same colour) so that no skin-coloured seam shows along the outline.
    d_fringe_outline = d_face_edge - f32(0.02) * s
    return {"d_face_edge": d_face_edge, "face": g.cover(d_face_edge), "ears": a_ears, "nose": a_nose,
            "back": g.cover(d_back), "fringe": g.cover(np.maximum(d_fringe_outline, d_hairline))}


def _eyes(g: _Grid) -> dict[str, np.ndarray]:
    """Open eyes (sclera, pupils) and closed ones (lids): both are computed, the masks need both footprints."""
    f32, X, Y, s, col = np.float32, g.X, g.Y, g.s, g.col
    ey = col("ey")
    exl, exr, efl, efr = col("exl"), col("exr"), col("efl"), col("efr")
    eye_w, eye_h = f32(0.07) * s, f32(0.056) * s
    d_sclera = np.minimum(_ellipse(X, Y, exl, ey, eye_w * efl, eye_h), _ellipse(X, Y, exr, ey, eye_w * efr, eye_h))
    pupil_y, pupil_w, pupil_h = ey + f32(0.006) * s, f32(0.031) * s, f32(0.036) * s
    d_pupil = np.minimum(
        _ellipse(X, Y, exl, pupil_y, pupil_w * efl, pupil_h),
        _ellipse(X, Y, exr, pupil_y, pupil_w * efr, pupil_h),
    )
    lid_bend, lid_thick = f32(0.018) * s, f32(0.032) * s
    d_closed = np.minimum(
        _curve_stroke(X, Y, exl, ey, eye_w * efl, lid_bend, lid_thick),
        _curve_stroke(X, Y, exr, ey, eye_w * efr, lid_bend, lid_thick),
    )
    margin = f32(0.03)
    d_region = np.minimum(
        _ellipse(X, Y, exl, ey, eye_w * efl + margin, eye_h + margin),
        _ellipse(X, Y, exr, ey, eye_w * efr + margin, eye_h + margin),
    )
    return {"sclera": g.cover(d_sclera), "pupil": g.cover(d_pupil), "closed": g.cover(d_closed), "d_region": d_region}


def _mouth(g: _Grid) -> dict[str, np.ndarray]:
    """Open grin with a strip of teeth (smile) or a short, slightly down-turned line (neutral)."""
    f32, X, Y, s, col = np.float32, g.X, g.Y, g.s, g.col
    mx, my, smile_w = col("mx"), col("my"), col("mw")
    d_smile = np.minimum(
        _between_curves(X, Y, mx, my, smile_w, f32(0.012) * s, f32(0.085) * s),
        _curve_stroke(X, Y, mx, my, smile_w, f32(0.012) * s, f32(0.03) * s),
    )
    d_teeth = np.maximum(_between_curves(X, Y, mx, my, smile_w * f32(0.85), f32(0.012) * s, f32(0.036) * s), d_smile)
    d_neutral = _curve_stroke(X, Y, mx, my + f32(0.035) * s, smile_w * f32(0.68), f32(-0.012) * s, f32(0.03) * s)
    margin = f32(0.03)
    d_region = _ellipse(X, Y, mx, my + f32(0.04) * s, smile_w + margin, f32(0.055) * s + margin)
    return {"smile": g.cover(d_smile), "teeth": g.cover(d_teeth), "neutral": g.cover(d_neutral), "d_region": d_region}


def _glasses(g: _Grid, d_face_edge: np.ndarray) -> dict[str, np.ndarray]:
    """Rims around the eyes, a bridge, arms to the face edge, lenses; clipped to the face outline."""
    f32, X, Y, s, col = np.float32, g.X, g.Y, g.s, g.col
    ey, exl, exr = col("ey"), col("exl"), col("exr")
    grx_l, grx_r = f32(0.09) * s * col("efl"), f32(0.09) * s * col("efr")
    gry = f32(0.08) * s
    gthick = f32(0.036) * s
    d_lens = np.minimum(_ellipse(X, Y, exl, ey, grx_l, gry), _ellipse(X, Y, exr, ey, grx_r, gry))
    d_rims = np.abs(d_lens) - gthick * f32(0.5)
    bridge_y = ey - f32(0.012) * s
    d_bridge = _hcapsule(X, Y, exl + grx_l, exr - grx_r, bridge_y, gthick * f32(0.5))
    d_arms = np.maximum(
        np.minimum(
            _hcapsule(X, Y, exl - grx_l - f32(0.2), exl - grx_l, bridge_y, gthick * f32(0.5)),
            _hcapsule(X, Y, exr + grx_r, exr + grx_r + f32(0.2), bridge_y, gthick * f32(0.5)),
        ),
        d_face_edge,
    )
    # Everything is clipped to the face outline (the far rim of a turned head).
    d_frame = np.maximum(np.minimum(np.minimum(d_rims, d_bridge), d_arms), d_face_edge)
    glasses = g.flag("glasses")
    return {"frame": g.cover(d_frame) * glasses, "lens": g.cover(np.maximum(d_lens, d_face_edge)) * glasses}


def _hat(g: _Grid) -> dict[str, np.ndarray]:
    """A dome over the top of the head with a band, and a brim."""
    f32, X, Y, s, col = np.float32, g.X, g.Y, g.s, g.col
    hat_y = col("hat_y")
    d_dome = np.maximum(_ellipse(X, Y, col("dome_x"), hat_y, f32(0.345) * s, f32(0.24) * s), Y - hat_y)
    d_band = np.maximum(d_dome, hat_y - f32(0.055) * s - Y)
    brim_x = col("brim_x")
    d_brim = _hcapsule(X, Y, brim_x - f32(0.36) * s, brim_x + f32(0.36) * s, hat_y, f32(0.028) * s)
    hat = g.flag("hat")
    return {"dome": g.cover(d_dome) * hat, "band": g.cover(d_band) * hat, "brim": g.cover(d_brim) * hat}


def _composite(g: _Grid, head: dict, eyes: dict, mouth: dict, glasses: dict, hat: dict) -> np.ndarray:
    """The supersampled image [B, 3, n, n]: every part painted over the background, back to front."""
    f32, n = np.float32, g.n
    hair_rgb = g.rgb([_palette(_HAIR_STOPS, a.hair_color) for a in g.attrs])
    skin_rgb = g.rgb([_palette(_SKIN_STOPS, a.skin_tone) for a in g.attrs])
    smile, eyes_open = g.flag("smile"), g.flag("eyes_open")
    bg = g.rgb([_background_rgb(a.background) for a in g.attrs])
    shade = f32(1.0) - f32(0.12) * g.Y.reshape(1, 1, n, 1)  # slightly darker lower down
    img = np.broadcast_to(bg * shade, (g.B, 3, n, n)).copy()

    def over(alpha: np.ndarray, color: np.ndarray | tuple[float, float, float]) -> None:
        if isinstance(color, tuple):
            color = np.asarray(color, dtype=f32).reshape(1, 3, 1, 1)
        a = alpha[:, None]
        img[...] += a * (color - img)

    over(head["back"], hair_rgb)
    over(head["ears"], skin_rgb * f32(0.9))
    over(head["face"], skin_rgb)
    over(head["nose"], skin_rgb * f32(0.8))
    over(head["fringe"], hair_rgb)
    over(eyes["sclera"] * eyes_open, _WHITE)
    over(eyes["pupil"] * eyes_open, _DARK)
    over(eyes["closed"] * (f32(1.0) - eyes_open), _DARK)
    over(mouth["smile"] * smile + mouth["neutral"] * (f32(1.0) - smile), _MOUTH)
    over(mouth["teeth"] * smile, _TEETH)
    over(glasses["lens"] * f32(_LENS_ALPHA), _LENS)
    over(glasses["frame"], _FRAME)
    over(hat["dome"], _HAT)
    over(hat["band"], _HAT_BAND)
    over(hat["brim"], _HAT_BRIM)
    return img


def _visible(g: _Grid, head: dict, eyes: dict, mouth: dict, glasses: dict, hat: dict) -> dict[str, np.ndarray]:
    """The supersampled coverage of every part as it shows in the image (what a part's mask is made of)."""
    f32 = np.float32
    a_hat = np.maximum(hat["dome"], hat["brim"])
    not_hat = f32(1.0) - a_hat
    head_skin = f32(1.0) - (f32(1.0) - head["face"]) * (f32(1.0) - head["ears"])
    d_face_edge = head["d_face_edge"]
    return {
        "face": head_skin * (f32(1.0) - head["fringe"]) * not_hat,
        "hair": (head["fringe"] + head["back"] * (f32(1.0) - head_skin) * (f32(1.0) - head["fringe"])) * not_hat,
        "eyes": np.maximum(
            g.cover(np.maximum(eyes["d_region"], d_face_edge)),
            np.maximum(np.maximum(eyes["sclera"], eyes["closed"]), eyes["pupil"]),
        ),
        "mouth": np.maximum(g.cover(np.maximum(mouth["d_region"], d_face_edge)), np.maximum(mouth["smile"], mouth["neutral"])),
        "glasses": np.maximum(glasses["frame"], glasses["lens"]) * not_hat,
        "hat": a_hat,
    }


def _render_chunk(attrs: Sequence[FaceAttributes], size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render faces; images [B, 3, H, W] in [0, 1] and masks [B, H, W] (supersampled, then averaged down)."""
    g = _Grid(attrs, size)
    head = _head(g)
    parts = (head, _eyes(g), _mouth(g), _glasses(g, head["d_face_edge"]), _hat(g))
    img, vis = _composite(g, *parts), _visible(g, *parts)
    ss = _SUPERSAMPLE

    def down(x: np.ndarray) -> np.ndarray:
        sh = x.shape[:-2] + (size, ss, size, ss)
        return x.reshape(sh).mean(axis=(-3, -1), dtype=np.float32)

    image = np.clip(down(img), np.float32(0.0), np.float32(1.0))
    masks = {part: down(vis[part]) > np.float32(_MASK_THRESHOLD) for part in PARTS}
    return image, masks


# ---------------------------------------------------------------------------
# Public rendering API


def _check_size(size: object) -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def _check_seed(seed: object) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_attrs(attrs: object) -> FaceAttributes:
    if not isinstance(attrs, FaceAttributes):
        raise ValueError(f"expected a FaceAttributes, got {type(attrs).__name__}")
    return attrs


def render(attrs: FaceAttributes, size: int = 32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one face.

    Returns the image, float32 of shape (size, size, 3) in [0, 1], and a dict
    of boolean (size, size) masks, one per part in ``PARTS``.
    """
    attrs = _check_attrs(attrs)
    size = _check_size(size)
    image, masks = _render_chunk([attrs], size)
    return (
        np.ascontiguousarray(image[0].transpose(1, 2, 0)),
        {part: m[0] for part, m in masks.items()},
    )


def render_seed(
    seed: int, size: int = 32, correlated: bool = True
) -> tuple[np.ndarray, FaceAttributes, dict[str, np.ndarray]]:
    """Sample the attributes of face ``seed`` and render it.

    The attributes come from ``sample_attributes(np.random.default_rng(seed),
    correlated)``.  Returns (image (H, W, 3) in [0, 1], attributes, masks).
    """
    seed = _check_seed(seed)
    size = _check_size(size)
    attrs = sample_attributes(np.random.default_rng(seed), correlated=correlated)
    image, masks = render(attrs, size)
    return image, attrs, masks


def render_many(
    attrs: Sequence[FaceAttributes], size: int = 32
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Render a batch of given attributes (e.g. edited copies of sampled ones).

    Returns images float32 [N, 3, H, W] in [-1, 1], labels (one float32 array
    of N per name in ``ATTRIBUTES``, binaries as 0/1) and boolean masks
    [N, H, W] per part.  Pixels equal those of ``render`` for each face.
    """
    attrs = [_check_attrs(a) for a in attrs]
    size = _check_size(size)
    N = len(attrs)
    images = np.empty((N, 3, size, size), dtype=np.float32)
    masks = {part: np.empty((N, size, size), dtype=bool) for part in PARTS}
    step = max(1, _CHUNK_PIXELS // (size * _SUPERSAMPLE) ** 2)  # 64 faces at size 32
    for start in range(0, N, step):
        chunk = attrs[start : start + step]
        img, m = _render_chunk(chunk, size)
        images[start : start + len(chunk)] = img * np.float32(2.0) - np.float32(1.0)
        for part in PARTS:
            masks[part][start : start + len(chunk)] = m[part]
    labels = {
        name: np.array([float(getattr(a, name)) for a in attrs], dtype=np.float32)
        for name in ATTRIBUTES
    }
    return images, labels, masks


def render_batch(
    seeds: Iterable[int], size: int = 32, correlated: bool = True
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Render the faces of several seeds (as ``render_seed`` would, batched).

    Returns images float32 [N, 3, H, W] in [-1, 1], labels (one float32 array
    of N per name in ``ATTRIBUTES``, binaries as 0/1) and boolean masks
    [N, H, W] per part in ``PARTS``.
    """
    if isinstance(seeds, (numbers.Integral, str, bytes)):
        raise ValueError(f"seeds must be an iterable of non-negative integers, got {seeds!r}")
    seed_list = [_check_seed(s) for s in seeds]
    size = _check_size(size)
    attrs = [
        sample_attributes(np.random.default_rng(s), correlated=correlated) for s in seed_list
    ]
    return render_many(attrs, size)


REGION_FACES = 2000
REGION_THRESHOLD = 0.1


@functools.lru_cache(maxsize=4)
def _regions(size: int) -> dict[str, np.ndarray]:
    _, _, masks = render_batch(range(REGION_FACES), size=size)
    return {part: m.mean(axis=0) >= REGION_THRESHOLD for part, m in masks.items()}


def region_mask(part: str, size: int = 32) -> np.ndarray:
    """Where ``part`` can be in a face of the training distribution: boolean (size, size).

    A generated face has no masks of its own, so an image region for it (e.g. the output mask of
    a Jacobian direction) is the set of pixels that the part covers in at least 10% of the
    training faces 0..1999.  It holds about 98-99% of each face's own part pixels (mouth: 82 of
    1024 pixels at size 32).
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    return _regions(_check_size(size))[part].copy()
