"""Engine speed options (speed.py) hold their stated tolerances: channels_last and torch.compile within 1e-4
of the default (samples, edits, Jacobian directions), bfloat16 autocast agrees in the classifier's labels
with h kept float32, an autocast bank is only extended by autocast, and --batch-size auto follows memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hspace.bank import build_bank
from hspace.cli import main
from hspace.directions.jacobian import jacobian_directions
from hspace.engine import Engine
from hspace.errors import HspaceError
from hspace.images import to_uint8
from hspace.speed import CPU_BATCH_CAP, Speed, activation_bytes, auto_batch_size
from hspace.toyfaces.classifier import classify
from hspace.toyfaces.render import BINARY
from conftest import tiny_engine

TOLERANCE = 1e-4


def _sample_and_edit(engine: Engine):
    trajectory = engine.sample(range(3), 8, 1.0, batch_size=3, progress=False)
    delta = torch.randn(8, *engine.h_shape, generator=torch.Generator().manual_seed(0))
    edited = engine.replay(trajectory, delta, scale=0.5, progress=False)
    return trajectory, edited


@pytest.mark.parametrize("model", ["toyfaces", "tiny-random"])
def test_channels_last_is_within_tolerance_of_the_default(model):
    reference, edited = _sample_and_edit(Engine.load(model))
    fast = Engine.load(model, speed=Speed(channels_last=True))
    weight = fast.unet.conv_in.weight  # [C, in, 3, 3]: its NHWC strides differ from the default ones
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    trajectory, fast_edited = _sample_and_edit(fast)
    assert float((trajectory.x0 - reference.x0).abs().max()) < TOLERANCE
    assert float((fast_edited.x0 - edited.x0).abs().max()) < TOLERANCE
    assert float((edited.x0 - reference.x0).abs().max()) > 100 * TOLERANCE  # the edit did something
    assert trajectory.h.dtype == torch.float32 and trajectory.h.is_contiguous()


def test_channels_last_and_autocast_on_a_guided_stable_diffusion_unet(tmp_path):
    import tiny_sd

    tiny_sd.sd_pipeline(tmp_path / "sd")
    condition = {"prompt": "a cat", "guidance": 7.5}
    reference, edited = _sample_and_edit(Engine.load(str(tmp_path / "sd"), **condition))
    trajectory, fast_edited = _sample_and_edit(Engine.load(str(tmp_path / "sd"), speed=Speed(channels_last=True), **condition))
    assert float((trajectory.x0 - reference.x0).abs().max()) < TOLERANCE
    assert float((fast_edited.x0 - edited.x0).abs().max()) < TOLERANCE
    autocast = Engine.load(str(tmp_path / "sd"), speed=Speed(autocast="bfloat16"), **condition)
    trajectory, _ = _sample_and_edit(autocast)
    assert trajectory.h.dtype == torch.float32
    assert 0 < float((trajectory.x0 - reference.x0).abs().mean()) < 0.1 * float(reference.x0.abs().mean())
    # the Jacobian's centre is h of a pass in the model's dtype, not of the autocast pass
    x_t = reference.x_T[:1]
    assert torch.equal(autocast.decoder_half(x_t, 500).h, Engine.load(str(tmp_path / "sd"), **condition).decoder_half(x_t, 500).h)


@pytest.mark.slow
def test_compiled_blocks_are_within_tolerance_and_edits_stay_eager():
    # conftest's 2-level U-Net: 7 compiled blocks; the 3-level tiny-random's 9 took 95 s to compile on a cold cache here, this 59 s
    eager_engine = tiny_engine()
    reference, edited = _sample_and_edit(eager_engine)
    compiled = tiny_engine(speed=Speed(compile=True))
    assert getattr(compiled.unet.mid_block, "_compiled_call_impl", None) is None  # h's module runs its hooks eagerly
    assert compiled.unet.up_blocks[0]._compiled_call_impl is not None
    trajectory, fast_edited = _sample_and_edit(compiled)
    assert float((trajectory.x0 - reference.x0).abs().max()) < TOLERANCE
    assert float((trajectory.h - reference.h).abs().max()) < TOLERANCE
    assert float((fast_edited.x0 - edited.x0).abs().max()) < TOLERANCE  # the edit reached the compiled U-Net
    assert float((edited.x0 - reference.x0).abs().max()) > 100 * TOLERANCE

    # The Jacobian's forward-mode products run the compiled blocks eagerly: the same directions
    found = jacobian_directions(compiled, reference, 0, steps=3, k=3, max_iter=20, tol=0.0, progress=False)[0]
    expected = jacobian_directions(eager_engine, reference, 0, steps=3, k=3, max_iter=20, tol=0.0, progress=False)[0]
    # (the 2nd and 3rd singular values are close and their vectors still turning after 20 iterations)
    assert torch.allclose(found.singular_values[:2], expected.singular_values[:2], rtol=1e-4)
    assert abs(float((found.svd.V[0] * expected.svd.V[0]).sum())) > 0.9999


def test_bfloat16_autocast_agrees_in_labels_and_keeps_h_float32():
    # 12 faces, 6 steps: bfloat16 is emulated on CPUs without its instructions (~30x slower than float32 here);
    # measured: mean |x_0| difference 0.0087, labels agree 100%, yaw 0.04 std apart
    full = Engine.load("toyfaces").sample(range(12), 6, 0.0, batch_size=12, progress=False)
    fast = Engine.load("toyfaces", speed=Speed(autocast="bfloat16")).sample(range(12), 6, 0.0, batch_size=12, progress=False)
    assert fast.h.dtype == torch.float32 and fast.x0.dtype == torch.float32
    difference = (fast.x0 - full.x0).abs()
    assert 1e-3 < float(difference.mean()) < 0.05  # reduced precision did run, and mostly agrees
    a, b = classify(full.x0), classify(fast.x0)
    agreement = torch.stack([(a[n] > 0.5) == (b[n] > 0.5) for n in BINARY]).float().mean()
    assert float(agreement) >= 0.9, float(agreement)
    assert float((a["yaw"] - b["yaw"]).abs().mean()) < 0.1 * float(a["yaw"].std())
    engine = Engine.load("toyfaces", speed=Speed(autocast="bfloat16"))
    few = engine.sample(range(2), 6, 0.0, batch_size=2, progress=False)
    assert torch.equal(engine.replay(few, batch_size=2, progress=False).x0, few.x0)  # recording h changed nothing (same batches)


def test_an_autocast_bank_is_extended_only_with_autocast(tmp_path):
    fast = Engine.load("tiny-random", speed=Speed(autocast="bfloat16"))
    bank = build_bank(tmp_path / "b", fast, 2, 3, 1.0, shard_size=2, progress=False)
    assert bank.spec.autocast == "bfloat16"
    with pytest.raises(HspaceError, match="spec.autocast: 'bfloat16' vs None"):
        build_bank(tmp_path / "b", Engine.load("tiny-random"), 4, 3, 1.0, shard_size=2, progress=False)
    assert build_bank(tmp_path / "b", fast, 4, 3, 1.0, shard_size=2, progress=False).complete
    plain = build_bank(tmp_path / "p", Engine.load("tiny-random"), 2, 3, 1.0, shard_size=2, progress=False)
    assert plain.spec.autocast is None
    with pytest.raises(HspaceError, match="spec.autocast: None vs 'bfloat16'"):
        build_bank(tmp_path / "p", fast, 4, 3, 1.0, shard_size=2, progress=False)


def test_batch_size_from_free_memory(monkeypatch, tmp_path):
    model = Engine.load("toyfaces").model
    one, two = activation_bytes(model, 1), activation_bytes(model, 2)
    assert one > 0 and two == 2 * one  # per-sample activations add up
    monkeypatch.setattr("hspace.speed.free_memory", lambda device: 10 * one)
    assert auto_batch_size(model) == 5 and auto_batch_size(model, fraction=0.2) == 2
    monkeypatch.setattr("hspace.speed.free_memory", lambda device: one // 4)
    assert auto_batch_size(model) == 1
    monkeypatch.setattr("hspace.speed.free_memory", lambda device: 10**6 * one)
    assert auto_batch_size(model) == CPU_BATCH_CAP
    monkeypatch.setattr("hspace.speed.free_memory", lambda device: 6 * one)
    assert main(["sample", "--model", "toyfaces", "--seeds", "0-3", "--steps", "2", "--batch-size", "auto", "--out", str(tmp_path)]) == 0
    # free memory for 6 samples, half of it used: batches of 3, so the images are exactly those of the 4 seeds drawn
    # here in batches of 3 (another batch size would sum floats in another order)
    expected = Engine.load("toyfaces").sample(range(4), 2, 1.0, batch_size=3, progress=False).images
    for seed in range(4):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"seed{seed}.png")), to_uint8(expected[seed])), seed


def test_bad_speed_options_are_named():
    with pytest.raises(HspaceError, match="unknown autocast dtype 'float8'; valid: bfloat16, float16"):
        Speed(autocast="float8")
    with pytest.raises(HspaceError, match="compile must be True or False"):
        Speed(compile="yes")
    with pytest.raises(HspaceError, match="autocast bfloat16 needs a float32 model"):
        Engine.load("tiny-random", dtype="float16", speed=Speed(autocast="bfloat16"))
    assert main(["sample", "--model", "toyfaces", "--batch-size", "big"]) == 2
