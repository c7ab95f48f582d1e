"""Tests of the procedural toy-face renderer (hspace.toyfaces.render)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hspace.toyfaces import render as tf

# Changing one part may change pixels outside its mask by less than this.
TOL = 1.0 / 255.0 + 1e-6
SEEDS = range(24)


def _attrs(seed: int) -> tf.FaceAttributes:
    return tf.sample_attributes(np.random.default_rng(seed))


def _changed(a: np.ndarray, b: np.ndarray, tol: float = TOL) -> np.ndarray:
    """Per-pixel mask of where two HxWx3 images differ by more than ``tol``."""
    return np.abs(a - b).max(axis=-1) > tol


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion: pixels whose whole 8-neighbourhood lies in ``mask``."""
    p = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy : dy + h, dx : dx + w]
    return out


# --- API basics ---------------------------------------------------------------


def test_constants_and_dataclass() -> None:
    assert tf.BINARY == ("smile", "eyes_open", "glasses", "hat")
    assert tf.CONTINUOUS == ("hair_color", "skin_tone", "yaw", "background")
    assert tf.PARTS == ("eyes", "mouth", "hair", "face", "glasses", "hat")
    a = _attrs(3)
    d = a.as_dict()
    assert list(d) == list(tf.BINARY + tf.CONTINUOUS)
    assert all(isinstance(v, float) for v in d.values())
    assert all(d[k] in (0.0, 1.0) for k in tf.BINARY)
    b = a.replace(glasses=not a.glasses, yaw=0.25)
    assert b.glasses is (not a.glasses) and b.yaw == 0.25 and b.smile == a.smile
    assert a.replace() == a
    assert tf.FaceAttributes(**a.as_dict(), face_scale=a.face_scale, face_dy=a.face_dy) == a
    with pytest.raises(Exception):
        a.smile = True  # frozen


def test_render_output_types_and_ranges() -> None:
    img, masks = tf.render(_attrs(0))
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(masks) == set(tf.PARTS)
    for m in masks.values():
        assert m.shape == (32, 32) and m.dtype == bool

    imgs, labels, bmasks = tf.render_batch([0, 1, 2])
    assert imgs.shape == (3, 3, 32, 32) and imgs.dtype == np.float32
    assert -1.0 <= imgs.min() and imgs.max() <= 1.0
    assert set(labels) == set(tf.BINARY + tf.CONTINUOUS)
    assert all(v.shape == (3,) for v in labels.values())
    assert set(bmasks) == set(tf.PARTS)
    assert all(m.shape == (3, 32, 32) and m.dtype == bool for m in bmasks.values())


# --- determinism ----------------------------------------------------------------


def test_same_seed_same_image_different_seed_different() -> None:
    a1, at1, m1 = tf.render_seed(7)
    a2, at2, m2 = tf.render_seed(7)
    assert at1 == at2
    assert np.array_equal(a1, a2)
    assert all(np.array_equal(m1[k], m2[k]) for k in tf.PARTS)
    b, _, _ = tf.render_seed(8)
    assert not np.array_equal(a1, b)
    images = [tf.render_seed(s)[0] for s in range(10)]
    for i in range(10):
        for j in range(i + 1, 10):
            assert np.abs(images[i] - images[j]).max() > 0.1


def test_batch_matches_single_renders() -> None:
    seeds = [5, 0, 123, 77, 5]
    imgs, labels, masks = tf.render_batch(seeds)
    for i, s in enumerate(seeds):
        img, attrs, m = tf.render_seed(s)
        assert np.array_equal(imgs[i], img.transpose(2, 0, 1) * np.float32(2) - np.float32(1))
        for name, value in attrs.as_dict().items():
            assert labels[name][i] == np.float32(value)
        for part in tf.PARTS:
            assert np.array_equal(masks[part][i], m[part])
    # A batch larger than the internal chunk renders the same too.
    big, _, _ = tf.render_batch(range(70))
    assert np.array_equal(big[69], tf.render_batch([69])[0][0])


def test_render_many_renders_given_attributes() -> None:
    a = _attrs(4)
    edited = [a, a.replace(smile=not a.smile)]
    imgs, labels, _ = tf.render_many(edited)
    assert labels["smile"].tolist() == [float(a.smile), float(not a.smile)]
    single, _ = tf.render(edited[1])
    assert np.array_equal(imgs[1], single.transpose(2, 0, 1) * np.float32(2) - np.float32(1))


# --- labels agree with what is drawn -------------------------------------------------


@pytest.mark.parametrize("attr, part", [
    ("glasses", "glasses"),
    ("eyes_open", "eyes"),
    ("smile", "mouth"),
    ("hat", "hat"),
])
def test_binary_toggle_changes_only_its_part(attr: str, part: str) -> None:
    for seed in SEEDS:
        a = _attrs(seed)
        on, off = a.replace(**{attr: True}), a.replace(**{attr: False})
        img_on, m_on = tf.render(on)
        img_off, m_off = tf.render(off)
        changed = _changed(img_on, img_off)
        # the part's mask (taken where the part is present) holds every change
        assert not (changed & ~m_on[part]).any(), (seed, attr)
        # and the change is substantial: a clearly visible attribute
        assert changed.sum() >= 6, (seed, attr, int(changed.sum()))
        assert np.abs(img_on - img_off).max() > 0.3, (seed, attr)


@pytest.mark.parametrize("attr, part", [("hair_color", "hair"), ("skin_tone", "face")])
def test_colour_change_stays_in_its_part(attr: str, part: str) -> None:
    for seed in SEEDS:
        a = _attrs(seed)
        a1, a2 = a.replace(**{attr: 0.0}), a.replace(**{attr: 1.0})
        (img1, m1), (img2, m2) = tf.render(a1), tf.render(a2)
        assert np.array_equal(m1[part], m2[part])
        changed = _changed(img1, img2)
        assert not (changed & ~m1[part]).any(), (seed, attr)
        assert changed.sum() >= 0.5 * m1[part].sum(), (seed, attr)


def test_background_changes_only_outside_the_head() -> None:
    for seed in SEEDS:
        a = _attrs(seed)
        b = a.replace(background=(a.background + 0.5) % 1.0)
        (img_a, m), (img_b, _) = tf.render(a), tf.render(b)
        head = m["face"] | m["hair"] | m["hat"]
        changed = _changed(img_a, img_b)
        assert changed[~head].all(), seed  # the whole background changes
        # the head does not (up to a sliver of background at the junctions of
        # two anti-aliased outlines, e.g. the tip of the hat brim over the hair)
        assert np.abs(img_a - img_b)[_erode(head)].max() < 0.05, seed
        assert head.sum() > 0.25 * head.size


def test_yaw_changes_many_pixels_globally() -> None:
    for seed in SEEDS:
        a = _attrs(seed)
        (img_l, m_l), (img_r, m_r) = tf.render(a.replace(yaw=-1.0)), tf.render(a.replace(yaw=1.0))
        changed = _changed(img_l, img_r, 0.05)
        assert changed.sum() > 120, seed
        # features and the head outline move: the changes span several parts
        for part in ("eyes", "mouth", "hair"):
            assert (changed & (m_l[part] | m_r[part])).any(), (seed, part)
        assert not np.array_equal(m_l["eyes"], m_r["eyes"])
        # the eyes move in the direction of the turn
        cols = np.arange(32)
        assert (cols * m_l["eyes"].sum(0)).sum() / m_l["eyes"].sum() < (
            cols * m_r["eyes"].sum(0)
        ).sum() / m_r["eyes"].sum()


def test_glasses_are_dark_and_visible_on_any_skin() -> None:
    for seed in SEEDS:
        for skin in (0.0, 1.0):
            a = _attrs(seed).replace(glasses=True, skin_tone=skin)
            img, m = tf.render(a)
            lum = img.mean(axis=-1)
            assert lum[m["glasses"]].min() < 0.15, (seed, skin)
            assert (lum[m["glasses"]] < 0.2).sum() >= 8, (seed, skin)


def test_open_eyes_have_white_and_dark_pixels_closed_eyes_have_no_white() -> None:
    for seed in SEEDS:
        a = _attrs(seed).replace(glasses=False)
        img_open, m = tf.render(a.replace(eyes_open=True))
        img_closed, _ = tf.render(a.replace(eyes_open=False))
        # white: every channel bright (the lightest skin has blue ~0.76)
        white_open = img_open.min(axis=-1)[m["eyes"]] > 0.85
        white_closed = img_closed.min(axis=-1)[m["eyes"]] > 0.85
        assert white_open.sum() >= 2 and not white_closed.any(), seed
        assert img_open.mean(axis=-1)[m["eyes"]].min() < 0.15, seed  # pupils
        assert img_closed.mean(axis=-1)[m["eyes"]].min() < 0.35, seed  # lid lines


def test_masks() -> None:
    for seed in range(40):
        img, a, m = tf.render_seed(seed)
        for part in ("eyes", "mouth", "face", "hair"):
            assert m[part].sum() >= 4, (seed, part)
        assert m["glasses"].any() == a.glasses, seed
        assert m["hat"].any() == a.hat, seed
        # eyes / mouth masks do not depend on the state of the eyes / mouth
        _, m2 = tf.render(a.replace(eyes_open=not a.eyes_open, smile=not a.smile))
        assert np.array_equal(m["eyes"], m2["eyes"]), seed
        assert np.array_equal(m["mouth"], m2["mouth"]), seed
        # local parts are small and lie on the face
        assert m["eyes"].sum() < 0.1 * m["eyes"].size
        assert m["mouth"].sum() < 0.1 * m["mouth"].size
        assert not (m["eyes"] & m["mouth"]).any()
        assert (m["eyes"] & m["face"]).sum() >= 0.8 * m["eyes"].sum()
        assert (m["mouth"] & m["face"]).sum() >= 0.9 * m["mouth"].sum()


# --- sampling distribution ---------------------------------------------------------


def _sample(n: int, correlated: bool) -> dict[str, np.ndarray]:
    rows = [
        tf.sample_attributes(np.random.default_rng(seed), correlated=correlated).as_dict()
        for seed in range(n)
    ]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def test_correlated_sampling_matches_documented_probabilities() -> None:
    s = _sample(5000, correlated=True)
    dark = s["hair_color"] < tf.DARK_HAIR_THRESHOLD
    smile = s["smile"] == 1
    assert abs(s["glasses"][dark].mean() - tf.P_GLASSES_DARK_HAIR) < 0.03
    assert abs(s["glasses"][~dark].mean() - tf.P_GLASSES_LIGHT_HAIR) < 0.03
    assert abs(s["hat"][smile].mean() - tf.P_HAT_SMILE) < 0.03
    assert abs(s["hat"][~smile].mean() - tf.P_HAT_NO_SMILE) < 0.03
    for name in tf.BINARY:
        assert 0.3 <= s[name].mean() <= 0.6, name
    # attributes outside the documented pairs are not correlated
    assert abs(s["eyes_open"][smile].mean() - s["eyes_open"][~smile].mean()) < 0.04
    assert abs(s["glasses"][smile].mean() - s["glasses"][~smile].mean()) < 0.04
    assert abs(np.corrcoef(s["skin_tone"], s["glasses"])[0, 1]) < 0.04
    assert abs(s["yaw"].mean()) < 0.04 and s["yaw"].min() < -0.99 and s["yaw"].max() > 0.99


def test_independent_sampling_has_no_correlation_and_same_marginals() -> None:
    s = _sample(5000, correlated=False)
    dark = s["hair_color"] < tf.DARK_HAIR_THRESHOLD
    smile = s["smile"] == 1
    assert abs(s["glasses"][dark].mean() - s["glasses"][~dark].mean()) < 0.04
    assert abs(s["hat"][smile].mean() - s["hat"][~smile].mean()) < 0.04
    assert abs(s["glasses"].mean() - tf.P_GLASSES) < 0.03
    assert abs(s["hat"].mean() - tf.P_HAT) < 0.03
    names = list(s)
    corr = np.corrcoef(np.stack([s[k] for k in names]))
    off_diagonal = corr[~np.eye(len(names), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.05


def test_modes_share_everything_but_the_correlated_bits() -> None:
    for seed in range(50):
        a = tf.sample_attributes(np.random.default_rng(seed), correlated=True)
        b = tf.sample_attributes(np.random.default_rng(seed), correlated=False)
        assert a.replace(glasses=b.glasses, hat=b.hat) == b


# --- sizes ------------------------------------------------------------------------


def test_size_64_is_a_sharper_version_of_32() -> None:
    for seed in range(6):
        img64, a, m64 = tf.render_seed(seed, size=64)
        img32, _, m32 = tf.render_seed(seed, size=32)
        assert img64.shape == (64, 64, 3) and all(v.shape == (64, 64) for v in m64.values())
        down = img64.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        assert np.abs(down - img32).mean() < 0.02, seed
        for part in ("eyes", "mouth", "face", "hair"):
            assert m64[part].sum() >= 2 * m32[part].sum(), (seed, part)
    imgs, _, masks = tf.render_batch([1, 2], size=64)
    assert imgs.shape == (2, 3, 64, 64) and masks["face"].shape == (2, 64, 64)
    img16, _ = tf.render(_attrs(0), size=16)
    assert img16.shape == (16, 16, 3)


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 15, 0, -32, 2048, 32.0, "32", True])
def test_bad_size_raises(size: object) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(size))):
        tf.render(_attrs(0), size=size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        tf.render_batch([0], size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value", [
    ("yaw", 1.5),
    ("yaw", -1.01),
    ("hair_color", -0.1),
    ("skin_tone", 2.0),
    ("background", float("nan")),
    ("smile", 0.5),
    ("glasses", "yes"),
    ("face_scale", 3.0),
])
def test_bad_attribute_raises(field: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        _attrs(0).replace(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)
    fields = _attrs(0).as_dict() | {"face_scale": 1.0, "face_dy": 0.0}
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        tf.FaceAttributes(**fields)  # type: ignore[arg-type]


def test_other_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="-1"):
        tf.render_seed(-1)
    with pytest.raises(ValueError, match="2.5"):
        tf.render_seed(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-3"):
        tf.render_batch([0, -3])
    with pytest.raises(ValueError, match="iterable"):
        tf.render_batch(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="moustache"):
        _attrs(0).replace(moustache=True)
    with pytest.raises(ValueError, match="Generator"):
        tf.sample_attributes(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="FaceAttributes"):
        tf.render({"smile": True})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="correlated"):
        tf.sample_attributes(np.random.default_rng(0), correlated="no")  # type: ignore[arg-type]


def test_numpy_integer_seeds_and_empty_batch() -> None:
    imgs, labels, _ = tf.render_batch(np.arange(3, dtype=np.int64))
    assert np.array_equal(imgs, tf.render_batch([0, 1, 2])[0])
    imgs, labels, masks = tf.render_batch([])
    assert imgs.shape == (0, 3, 32, 32) and labels["smile"].shape == (0,)
    assert masks["eyes"].shape == (0, 32, 32)


def test_region_masks_hold_the_parts_of_unseen_faces():
    _, _, masks = tf.render_batch(range(90000, 90300), size=32)
    for part in ("eyes", "mouth", "hat"):
        region = tf.region_mask(part)
        own = masks[part]
        inside = (own & region[None]).sum() / own.sum()
        assert inside >= 0.95, (part, inside)
        assert region.sum() < 0.25 * region.size  # a region, not the whole image
    assert not (tf.region_mask("eyes") & tf.region_mask("mouth")).any()
    with pytest.raises(ValueError, match="unknown part 'nose'"):
        tf.region_mask("nose")
