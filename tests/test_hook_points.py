"""Hook points on the bare diffusers modules (read and written inside a diffusers pipeline's own call), several h
locations in one run, banks of several locations, ``Engine.at``, and what each family's conditioning says."""

from __future__ import annotations

import pytest
import torch

import tiny_sd
import tiny_transformers
from hspace.bank import build_bank, build_banks
from hspace.engine import Engine
from hspace.errors import HspaceError
from hspace.interventions import Record
from hspace.models import DiTCall, FluxCall, TransformerCall, UNetCall, hook_points

STEPS = 3
GUIDANCE = {"sd": 3.0, "pixart": 4.5, "flux": 3.5}
PIPELINE_OPTIONS = {"sd": {}, "pixart": {"use_resolution_binning": False, "clean_caption": False}, "flux": {}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    pipes = {"sd": tiny_sd.sd_pipeline(root / "sd"), "pixart": tiny_transformers.pixart_pipeline(root / "pixart"),
             "flux": tiny_transformers.flux_pipeline(root / "flux")}
    return root, pipes


def _engine(root, kind: str, **extra) -> Engine:
    size = {"height": 64, "width": 64} if kind == "flux" else {}
    return Engine.load(str(root / kind), prompt="a cat", guidance=GUIDANCE[kind], **size, **extra)


def _pipeline_run(pipe, kind: str, engine: Engine, x_T: torch.Tensor, fn) -> torch.Tensor:
    """The pipeline's final latents from x_T (DDIM eta 0 / its flow), with ``fn`` at the engine's h location on its denoiser."""
    denoiser = pipe.unet if kind == "sd" else pipe.transformer
    options = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE[kind], "output_type": "latent", **PIPELINE_OPTIONS[kind]}
    latents = FluxCall.pack(x_T.clone()) if kind == "flux" else x_T.clone()
    if kind == "flux":
        options.update(height=engine.image_size[0], width=engine.image_size[1])
    with hook_points(denoiser)[engine.h_location].attach(denoiser, fn):
        out = pipe("a cat", latents=latents, **options).images
    return FluxCall.unpack(out, tuple(x_T.shape[2:])) if kind == "flux" else out


@pytest.mark.parametrize("kind", ["sd", "pixart", "flux"])
def test_a_hook_point_reads_and_writes_h_inside_the_pipelines_own_call_as_the_engine_does(folders, kind):
    """The point that hspace's loop uses, attached to the bare module a diffusers pipeline calls: the h it sees there
    at every step (both passes under cfg, in the pipeline's batch order) is the engine's recorded h, and adding the
    same delta there gives the engine's edited sample."""
    root, pipes = folders
    engine = _engine(root, kind)
    x_T = torch.randn(1, *engine.sample_shape, generator=torch.Generator().manual_seed(3))
    record = Record(branch="both" if engine.model.guided else None)
    ours = engine.run(x_T, STEPS, 0.0, interventions=[record], progress=False)
    seen = []
    theirs = _pipeline_run(pipes[kind], kind, engine, x_T, lambda h: (seen.append(h.detach().clone()), h)[1])
    seen = torch.stack(seen)  # [T, passes * N, *h]: the pipeline batches [uncond, cond]
    recorded = record.h[0]  # [T, (2,) *h]: one sample, under cfg the unconditional pass first
    assert seen.shape[0] == STEPS and seen.numel() == recorded.numel()
    scale = float(recorded.abs().max())
    assert float((seen.reshape(recorded.shape) - recorded).abs().max()) < 1e-4 * max(1.0, scale)
    assert float((ours - theirs).abs().max()) < 1e-4 * max(1.0, float(theirs.abs().max()))

    delta = 0.5 * torch.randn(*engine.h_shape, generator=torch.Generator().manual_seed(1))
    edited = engine.run(x_T, STEPS, 0.0, interventions=[lambda h, ctx: h + delta.to(h)], progress=False)
    theirs_edited = _pipeline_run(pipes[kind], kind, engine, x_T, lambda h: h + delta.to(h))
    assert float((edited - ours).abs().max()) > 1e-3  # the delta moves the sample
    assert float((edited - theirs_edited).abs().max()) < 1e-4 * max(1.0, float(theirs_edited.abs().max()))


def test_a_hook_point_returning_h_leaves_the_bare_modules_output_bit_for_bit(folders):
    root, pipes = folders
    denoiser = pipes["pixart"].transformer
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 32), "timestep": torch.tensor([500, 500]),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        plain = denoiser(x, **kwargs).sample
        for name, point in hook_points(denoiser).items():
            with point.attach(denoiser, lambda h: h):
                assert torch.equal(denoiser(x, **kwargs).sample, plain), name
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in denoiser.modules()) == 0


@pytest.mark.parametrize("kind", ["toydit", "pixart", "flux"])
def test_one_record_at_two_locations_equals_two_runs_at_one_location_each(folders, kind):
    root, _ = folders
    engine = Engine.load("toydit") if kind == "toydit" else _engine(root, kind)
    names = list(engine.model.locations())
    first, last = names[0], names[-1]
    branch = "both" if engine.model.guided else None
    both = Record(branch=branch, locations=[first, last])
    engine.sample([0, 1], STEPS, 1.0, record_h=False, interventions=[both], progress=False)
    for name in (first, last):
        one = Record(branch=branch)
        engine.at(name).sample([0, 1], STEPS, 1.0, record_h=False, interventions=[one], progress=False)
        assert torch.equal(both.h_at(name), one.h)
    assert list(both.by_location()) == [first, last]  # in forward order
    with pytest.raises(HspaceError, match="h_at"):
        both.h


def test_engine_at_shares_the_model_and_equals_loading_at_that_location():
    engine = Engine.load("toydit")
    default = engine.h_location
    moved = engine.at("block.-2")
    assert moved.h_location == "block.4" and moved.spec.h_location == "block.4" and engine.h_location == default != "block.4"
    assert moved.unet is engine.unet  # no reload
    loaded = Engine.load("toydit", h_location="block.4")
    assert moved.spec == loaded.spec and moved.h_shape == loaded.h_shape
    assert torch.equal(moved.sample([4], 3, 1.0, progress=False).h, loaded.sample([4], 3, 1.0, progress=False).h)
    with pytest.raises(HspaceError, match="block.6.*valid: block.0 to block.5"):
        engine.at("block.6")


def test_banks_of_several_locations_from_one_draw_equal_one_bank_per_location(tmp_path):
    engine = Engine.load("toydit")
    paths = {"block.0": tmp_path / "shared" / "0", "block.5": tmp_path / "shared" / "5"}
    shared = build_banks(paths, engine, 3, 2, 1.0, shard_size=2, progress=False)
    for name in paths:
        alone = build_bank(tmp_path / "alone" / name, engine.at(name), 3, 2, 1.0, shard_size=2, progress=False)
        assert shared[name].spec.h_location == name
        assert shared[name].manifest == alone.manifest
        assert torch.equal(shared[name].h(), alone.h()) and torch.equal(shared[name].thumbnails(), alone.thumbnails())
    # one location missing a shard: drawn again, the other untouched
    (paths["block.5"] / "shard-000000000002.safetensors").unlink()
    before = (paths["block.0"] / "shard-000000000002.safetensors").stat().st_mtime_ns
    again = build_banks(paths, engine, 3, 2, 1.0, shard_size=2, progress=False)
    assert again["block.5"].complete and torch.equal(again["block.5"].h(), shared["block.5"].h())
    assert (paths["block.0"] / "shard-000000000002.safetensors").stat().st_mtime_ns == before


def test_a_transformer_backbone_is_no_unet_and_every_family_names_its_points(folders):
    assert not issubclass(DiTCall, UNetCall) and not issubclass(TransformerCall, UNetCall)
    root, pipes = folders
    assert list(hook_points(pipes["sd"].unet)) == ["mid.out", "mid.in"]
    assert list(hook_points(pipes["flux"].transformer)) == ["joint.0", "single.0"]
    assert list(hook_points(pipes["pixart"].transformer)) == ["block.0", "block.1", "block.2"]


def test_precomputed_embeddings_on_sd3_are_a_clear_error(tmp_path):
    engine = Engine.from_pipeline(tiny_transformers.sd3_pipeline(tmp_path / "sd3"), prompt="a cat")
    with pytest.raises(HspaceError, match="precomputed embeddings.*not yet for this model"):
        engine.sample([0], 2, prompts=["<prompt embeds 0123456789abcdef>"], progress=False)


def test_sdxl_defaults_to_the_pipelines_guidance_and_sd_to_its_own(folders, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    import inspect

    root, _ = folders
    xl = Engine.from_pipeline(tiny_sd.sdxl_pipeline(tmp_path / "sdxl"), prompt="a cat")
    sd = Engine.load(str(root / "sd"), prompt="a cat")
    assert xl.spec.guidance == inspect.signature(StableDiffusionXLPipeline.__call__).parameters["guidance_scale"].default == 5.0
    assert sd.spec.guidance == inspect.signature(StableDiffusionPipeline.__call__).parameters["guidance_scale"].default == 7.5
