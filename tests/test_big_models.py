"""Big-model options on tiny FLUX and SD3 pipelines: diffusers' layerwise casting (float8 storage) through
Engine.from_pipeline, Engine.edit and steer; the fingerprint of cast weights; directions of the full-precision model."""

import pytest
import torch

import hspace
import tiny_transformers
from hspace.engine import Engine
from hspace.errors import HspaceError
from test_steer import GUIDED, _direction, _pixels, _transformer_images

STEPS = 3


def _cast(pipe, compute=torch.float32):
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes():
    build = {"flux": tiny_transformers.flux_pipeline, "sd3": tiny_transformers.sd3_pipeline}
    return {kind: (make(), _cast(make())) for kind, make in build.items()}  # (plain, float8 storage) of the same weights


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_float8_stored_transformer_samples_edits_and_steers_as_its_own_pipeline(pipes, kind):
    plain, cast = pipes[kind]
    prompt, guidance = GUIDED[kind]
    assert {p.dtype for p in cast.transformer.parameters()} >= {torch.float8_e4m3fn}
    engine = Engine.from_pipeline(cast, prompt=prompt, guidance=guidance)
    assert engine.dtype == torch.float32 and any(p.dtype == torch.float8_e4m3fn for p in cast.transformer.parameters())  # storage kept
    trajectory = engine.sample([3], STEPS, 0.0, progress=False)
    own = _transformer_images(cast, kind, trajectory.x_T, guidance, STEPS)[0]
    assert float((_pixels(trajectory.images[0]) - own).abs().max()) < 1e-4  # the cast pipeline's own call
    full = _transformer_images(plain, kind, trajectory.x_T, guidance, STEPS)[0]
    assert float((own - full).abs().max()) > 1e-4  # float8 weights are other weights: the images differ
    d = _direction(engine, 5, 2.0, steps=STEPS)
    expected = _pixels(engine.edit(trajectory, [d], [1.0], progress=False).images[0, 0])
    with hspace.steer(cast, d, 1.0):
        steered = _transformer_images(cast, kind, trajectory.x_T, guidance, STEPS)[0]
    assert float((steered - expected).abs().max()) < 1e-4 and float((steered - own).abs().max()) > 1e-3


def test_cast_weights_are_another_model_and_a_full_precision_direction_applies_by_architecture(pipes):
    plain, cast = pipes["flux"]
    full = Engine.from_pipeline(plain, prompt="a cat", guidance=3.5)
    stored = Engine.from_pipeline(cast, prompt="a cat", guidance=3.5)
    arch_full, weights_full = full.spec.denoiser.split(":")
    arch_cast, weights_cast = stored.spec.denoiser.split(":")
    assert arch_full == arch_cast and weights_full != weights_cast  # same shapes and config, other (float8-rounded) weights
    d = _direction(full, 5, 2.0, steps=STEPS)
    with pytest.raises(HspaceError, match=weights_full):
        with hspace.steer(cast, d, 1.0):
            pass
    x_T = stored.sample([3], STEPS, 0.0, progress=False).x_T
    with hspace.steer(cast, d, 1.0, check="architecture"):
        steered = _transformer_images(cast, "flux", x_T, 3.5, STEPS)[0]
    assert float((steered - _transformer_images(cast, "flux", x_T, 3.5, STEPS)[0]).abs().max()) > 1e-3


def test_a_dtype_other_than_the_cast_modules_compute_dtype_is_a_clear_error(pipes):
    _, cast = pipes["flux"]
    with pytest.raises(HspaceError, match="computes in torch.float32 from weights stored in a format of its own"):
        Engine.from_pipeline(cast, prompt="a cat", guidance=3.5, dtype="bfloat16")


def test_a_torchao_int8_weight_only_transformer_samples_and_steers_as_its_own_pipeline():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    plain = tiny_transformers.flux_pipeline()
    quantized = tiny_transformers.flux_pipeline()
    quantized.set_progress_bar_config(disable=True)
    quantize_(quantized.transformer, Int8WeightOnlyConfig())
    engine = Engine.from_pipeline(quantized, prompt="a cat", guidance=3.5)
    full = Engine.from_pipeline(plain, prompt="a cat", guidance=3.5)
    assert engine.spec.denoiser.split(":")[0] == full.spec.denoiser.split(":")[0] and engine.spec.denoiser != full.spec.denoiser
    assert engine.spec.fingerprint != full.spec.fingerprint  # int8 weights and their scales are hashed as stored
    trajectory = engine.sample([3], STEPS, 0.0, progress=False)
    own = _transformer_images(quantized, "flux", trajectory.x_T, 3.5, STEPS)[0]
    assert float((_pixels(trajectory.images[0]) - own).abs().max()) < 1e-4
    d = _direction(engine, 5, 2.0, steps=STEPS)
    expected = _pixels(engine.edit(trajectory, [d], [1.0], progress=False).images[0, 0])
    with hspace.steer(quantized, d, 1.0):
        steered = _transformer_images(quantized, "flux", trajectory.x_T, 3.5, STEPS)[0]
    assert float((steered - expected).abs().max()) < 1e-4 and float((steered - own).abs().max()) > 1e-3
