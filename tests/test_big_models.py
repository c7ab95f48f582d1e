"""Big-model options on tiny FLUX and SD3 pipelines: diffusers' layerwise casting (float8 storage), torchao int8 and GGUF
checkpoints (written here with the gguf package) through Engine.from_pipeline, Engine.edit and steer; the fingerprint of
cast and quantized weights; directions of the full-precision model."""

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


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_torchao_int8_weight_only_transformer_samples_and_steers_as_its_own_pipeline(kind):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    build = {"flux": tiny_transformers.flux_pipeline, "sd3": tiny_transformers.sd3_pipeline}[kind]
    prompt, guidance = GUIDED[kind]
    plain, quantized = build(), build()
    quantized.set_progress_bar_config(disable=True)
    quantize_(quantized.transformer, Int8WeightOnlyConfig())
    engine = Engine.from_pipeline(quantized, prompt=prompt, guidance=guidance)
    full = Engine.from_pipeline(plain, prompt=prompt, guidance=guidance)
    assert engine.spec.denoiser.split(":")[0] == full.spec.denoiser.split(":")[0] and engine.spec.denoiser != full.spec.denoiser
    assert engine.spec.fingerprint != full.spec.fingerprint  # int8 weights and their scales are hashed as stored
    trajectory = engine.sample([3], STEPS, 0.0, progress=False)
    own = _transformer_images(quantized, kind, trajectory.x_T, guidance, STEPS)[0]
    assert float((_pixels(trajectory.images[0]) - own).abs().max()) < 1e-4
    d = _direction(engine, 5, 2.0, steps=STEPS)
    expected = _pixels(engine.edit(trajectory, [d], [1.0], progress=False).images[0, 0])
    with hspace.steer(quantized, d, 1.0):
        steered = _transformer_images(quantized, kind, trajectory.x_T, guidance, STEPS)[0]
    assert float((steered - expected).abs().max()) < 1e-4 and float((steered - own).abs().max()) > 1e-3


def _gguf(pipe, path, qtype):
    pytest.importorskip("gguf")
    return tiny_transformers.write_gguf(pipe.transformer, path, qtype)


def _gguf_pipe(folder, path):
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

    transformer = FluxTransformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer", torch_dtype=torch.float32,
                                                          quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    pipe = FluxPipeline.from_pretrained(folder, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_gguf_checkpoint_loads_fingerprints_samples_and_steers_and_q4_is_another_model_than_q8(tmp_path):
    gguf = pytest.importorskip("gguf")
    plain = tiny_transformers.flux_pipeline()
    plain.save_pretrained(tmp_path / "flux")
    q8 = _gguf(plain, tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    q4 = _gguf(plain, tmp_path / "q4.gguf", gguf.GGMLQuantizationType.Q4_0)
    pipe8 = _gguf_pipe(tmp_path / "flux", q8)
    assert any(type(p).__name__ == "GGUFParameter" for p in pipe8.transformer.parameters())  # stored quantized
    engine = Engine.from_pipeline(pipe8, prompt="a cat", guidance=3.5)
    again = Engine.from_pipeline(_gguf_pipe(tmp_path / "flux", q8), prompt="a cat", guidance=3.5)
    pipe4 = _gguf_pipe(tmp_path / "flux", q4)
    engine4 = Engine.from_pipeline(pipe4, prompt="a cat", guidance=3.5)
    full = Engine.from_pipeline(plain, prompt="a cat", guidance=3.5)
    assert again.spec.fingerprint == engine.spec.fingerprint and again.spec.denoiser == engine.spec.denoiser  # the same file
    arch = {e.spec.denoiser.split(":")[0] for e in (engine, engine4, full)}
    assert len(arch) == 1 and len({e.spec.denoiser for e in (engine, engine4, full)}) == 3  # one architecture, three weights
    trajectory = engine.sample([3], STEPS, 0.0, progress=False)
    own = _transformer_images(pipe8, "flux", trajectory.x_T, 3.5, STEPS)[0]
    assert float((_pixels(trajectory.images[0]) - own).abs().max()) < 1e-4  # the GGUF pipeline's own call
    assert float((own - _transformer_images(plain, "flux", trajectory.x_T, 3.5, STEPS)[0]).abs().max()) > 1e-4
    d = _direction(engine, 5, 2.0, steps=STEPS)
    expected = _pixels(engine.edit(trajectory, [d], [1.0], progress=False).images[0, 0])
    with hspace.steer(pipe8, d, 1.0):  # h is read and written at the hook point of the quantized blocks
        steered = _transformer_images(pipe8, "flux", trajectory.x_T, 3.5, STEPS)[0]
    assert float((steered - expected).abs().max()) < 1e-4 and float((steered - own).abs().max()) > 1e-3
    with pytest.raises(HspaceError, match=r"its weights differ .*stored as gguf Q4_0.*a GGUF Q4 and a Q8 are different models"):
        with hspace.steer(pipe4, d, 1.0):
            pass
    with hspace.steer(pipe4, d, 1.0, check="architecture"):  # found on Q8, applied to Q4 when the user asks
        steered4 = _transformer_images(pipe4, "flux", trajectory.x_T, 3.5, STEPS)[0]
    assert float((steered4 - _transformer_images(pipe4, "flux", trajectory.x_T, 3.5, STEPS)[0]).abs().max()) > 1e-3
