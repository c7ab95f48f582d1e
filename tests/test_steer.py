"""hspace.steer and hspace.record inside the user's own diffusers pipeline (steering.py): under the pipeline's DDIM a
steered call equals Engine.edit; under other schedulers it equals a hand-written hook; the pipeline is exactly as
before after the block, also after an exception; what cannot be steered is refused, never a silent no-op."""

from __future__ import annotations

import pytest
import torch

import tiny_sd
import hspace
from hspace.directions.direction import Direction
from hspace.edits import Edit
from hspace.engine import Engine
from hspace.errors import HspaceError

STEPS = 6


def _direction(engine, seed=0, scale=1.0, steps=STEPS):
    """A random direction over the engine's own timesteps of ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(steps, *engine.h_shape, generator=gen) * scale
    return Direction(delta, meta={"name": f"d{seed}"}, spec=engine.spec, timesteps=engine.schedule(steps).timesteps)


@pytest.fixture(scope="module")
def toyfaces():
    from diffusers import DDPMPipeline, DDPMScheduler

    engine = Engine.load("toyfaces")
    pipe = DDPMPipeline(unet=engine.unet, scheduler=DDPMScheduler.from_config(engine.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return engine, pipe


def _pipe_images(pipe, seed, steps=STEPS):
    out = pipe(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="np").images
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _pixels(images):
    """hspace's images ([-1, 1]) as the pipelines post-process them ([0, 1])."""
    return (images / 2 + 0.5).clamp(0, 1)


def _with_scheduler(pipe, name):
    import diffusers

    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    return pipe


def test_steer_under_the_pipelines_ddim_equals_engine_edit_and_the_pipeline_is_unchanged_after(toyfaces):
    engine, pipe = toyfaces
    _with_scheduler(pipe, "DDIMScheduler")
    d = _direction(engine, 0, 3.0)
    trajectory = engine.sample([5], STEPS, 0.0, progress=False)
    before = _pipe_images(pipe, 5)
    # DDPMPipeline with a DDIM scheduler steps at eta 0: the pipeline's image is hspace's sample of seed 5
    assert float((before - _pixels(trajectory.images)).abs().max()) < 1e-4
    window = (float(engine.schedule(STEPS).t(1)), float(engine.schedule(STEPS).t(4)))
    for options in ({}, {"window": window}):
        expected = _pixels(engine.edit(trajectory, Edit([d], [1.5], **options), progress=False).images[0, 0])
        with hspace.steer(pipe, d, 1.5, **options) as handle:
            steered = _pipe_images(pipe, 5)
            assert handle.scales == [1.5]
        assert float((steered - expected).abs().max()) < 1e-4, options
        assert float((steered - before).abs().max()) > 1e-2  # the edit did something
    assert torch.equal(_pipe_images(pipe, 5), before)  # exactly its old image after the block
    with pytest.raises(RuntimeError, match="the user's own"):
        with hspace.steer(pipe, d, 1.5):
            raise RuntimeError("the user's own error")
    assert torch.equal(_pipe_images(pipe, 5), before)  # also after an exception
    assert not pipe.unet._forward_pre_hooks and not pipe.unet.mid_block._forward_hooks


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_steer_under_other_schedulers_equals_a_hand_written_hook(toyfaces, scheduler):
    """The reference: one forward hook on the mid block adding scale * direction.at(t) for the t the U-Net was called
    with (read by a pre-hook), written here by hand. A direction of 6 steps is resampled to the 9 the pipeline visits."""
    engine, pipe = toyfaces
    _with_scheduler(pipe, scheduler)
    d = _direction(engine, 1, 3.0)
    seen = []

    def read(_m, args):
        seen.append(float(torch.as_tensor(args[1]).reshape(-1)[0]))

    def add(_m, _a, output):
        return output + 0.8 * d.at(torch.tensor([seen[-1]], dtype=torch.float64)).delta[0]

    handles = [pipe.unet.register_forward_pre_hook(read), pipe.unet.mid_block.register_forward_hook(add)]
    try:
        expected = _pipe_images(pipe, 2, steps=9)
    finally:
        for h in handles:
            h.remove()
    assert len(set(seen)) == 9 and not set(seen) <= set(d.timesteps.tolist())  # steps the direction was not found at
    with hspace.steer(pipe, [d], [0.8]):
        steered = _pipe_images(pipe, 2, steps=9)
    assert float((steered - expected).abs().max()) < 1e-5
    assert float((steered - _pipe_images(pipe, 2, steps=9)).abs().max()) > 1e-2


def test_scales_move_without_rehooking_and_two_directions_add(toyfaces):
    engine, pipe = toyfaces
    _with_scheduler(pipe, "DDIMScheduler")
    a, b = _direction(engine, 2, 2.0), _direction(engine, 3, 2.0)
    trajectory = engine.sample([4], STEPS, 0.0, progress=False)
    with hspace.steer(pipe, [a, b], [1.0, 0.0]) as handle:
        first = _pipe_images(pipe, 4)
        handle.scales = [0.5, -1.0]
        moved = _pipe_images(pipe, 4)
    assert float((first - _pixels(engine.edit(trajectory, [a], [1.0], progress=False).images[0, 0])).abs().max()) < 1e-4
    assert float((moved - _pixels(engine.edit(trajectory, [a * 0.5 + b * -1.0], [1.0], progress=False).images[0, 0])).abs().max()) < 1e-4
    with pytest.raises(HspaceError, match="2 scales for 1 directions"):
        hspace.steer(pipe, a, [1.0, 2.0])
    with pytest.raises(HspaceError, match="unknown branch 'pos'"):
        hspace.steer(pipe, a, 1.0, branch="pos")
    with pytest.raises(HspaceError, match=r"window \(100, 900\) must run from the larger timestep"):
        hspace.steer(pipe, a, 1.0, window=(100, 900))
    assert not pipe.unet._forward_pre_hooks  # a refused steer leaves nothing behind


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "sd"
    pipe = tiny_sd.sd_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


@pytest.mark.parametrize("branch", ["both", "cond", "uncond"])
def test_steer_under_guidance_edits_the_branch_the_engine_edits(sd, branch):
    folder, pipe = sd
    engine = Engine.load(str(folder), prompt="a cat", guidance=4.0, guide_edit=branch)
    d = _direction(engine, 4, 2.0)
    trajectory = engine.sample([3], STEPS, 0.0, progress=False)
    expected = _pixels(engine.edit(trajectory, [d], [1.0], progress=False).images[0, 0])
    with hspace.steer(pipe, d, 1.0, branch=branch):
        steered = pipe("a cat", num_inference_steps=STEPS, guidance_scale=4.0, eta=0.0, generator=torch.Generator().manual_seed(3),
                       output_type="pt").images[0]
    assert float((steered - expected).abs().max()) < 1e-4


def test_what_cannot_be_steered_is_refused(sd, toyfaces):
    _, pipe = sd
    engine, ddpm = toyfaces
    with pytest.raises(HspaceError, match=r"h of shape \(128, 8, 8\), but this model's h at 'mid.out' is \(16, 8, 8\)"):
        with hspace.steer(pipe, _direction(engine), 1.0, check=False):
            pipe("a cat", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert not pipe.unet._forward_pre_hooks
    with pytest.raises(HspaceError, match="neither a unet nor a transformer"):
        hspace.steer(object(), _direction(engine), 1.0)
    compiled = type(ddpm)(unet=torch.compile(ddpm.unet), scheduler=ddpm.scheduler)
    with pytest.raises(HspaceError, match="was compiled"):
        hspace.steer(compiled, _direction(engine), 1.0)
    carded = _direction(engine)
    with pytest.raises(HspaceError, match="direction 'd0' has no card"):
        hspace.steer(ddpm, carded, 1.0, units="effect")


def test_a_direction_is_checked_against_the_denoisers_weights_not_its_scheduler_or_folder(sd, tmp_path, caplog):
    """The identity steer compares is the denoiser's (architecture and weights): the folder hspace loaded and the same
    weights in a pipeline of another scheduler and in float16 agree; a fused LoRA (weights changed) and another model
    are refused with both fingerprints, unless check says otherwise; a LoRA loaded but not fused is said once."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    folder, _ = sd
    engine = Engine.load(str(folder), prompt="a cat", guidance=1.0)
    d = _direction(engine, 9, 2.0)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("a cat", num_inference_steps=3, guidance_scale=1.0, output_type="latent").images  # noqa: E731
    with hspace.steer(pipe, d, 1.0):  # another scheduler, another loading of the folder: the same denoiser
        run()
    pipe.unet.to(torch.float16)
    with hspace.steer(pipe, d, 1.0):  # weights hashed at float16: the float32 model's direction is its own
        pass
    pipe.unet.to(torch.float32)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    with caplog.at_level("WARNING", logger="hspace.steering"), hspace.steer(pipe, d, 1.0):
        run()
    assert "LoRA loaded but not fused" in caplog.text
    pipe.unet.fuse_lora()
    with pytest.raises(HspaceError, match=r"direction 'd9' was found on another denoiser: its weights differ \(fingerprint \w+:\w+ .* vs "
                                          r"this pipeline's UNet2DConditionModel \w+:\w+, weights stored as float32\).*check='architecture'"):
        hspace.steer(pipe, d, 1.0)
    assert not pipe.unet._forward_pre_hooks
    with hspace.steer(pipe, d, 1.0, check="architecture"):
        run()
    other = tiny_sd.sd_pipeline(seed=1)  # the same architecture, other weights
    for check, message in ((True, "its weights differ"), ("architecture", None), (False, None)):
        if message:
            with pytest.raises(HspaceError, match=message):
                hspace.steer(other, d, 1.0, check=check)
        else:
            hspace.steer(other, d, 1.0, check=check).remove()
    with pytest.raises(HspaceError, match="its architecture differ.*check=False steers it anyway"):
        hspace.steer(tiny_sd.sdxl_pipeline(), d, 1.0, check="architecture")
    with pytest.raises(HspaceError, match=r"check must be True .* got 'weights'"):
        hspace.steer(other, d, 1.0, check="weights")


def test_steer_in_sdxl_equals_engine_edit_and_in_img2img_a_hand_written_hook(tmp_path, sd):
    """SDXL (two text encoders, added time conditioning, guided halves) under its DDIM is Engine.edit's image; the
    img2img variant of SD (starts part-way, at its own strength) is a hand-written hook's."""
    from diffusers import StableDiffusionImg2ImgPipeline

    folder = tmp_path / "sdxl"
    pipe = tiny_sd.sdxl_pipeline(folder)
    engine = Engine.load(str(folder), prompt="a cat", guidance=5.0, guide_edit="cond")
    trajectory = engine.sample([3], STEPS, 0.0, progress=False)
    d = _direction(engine, 10, 2.0)
    expected = _pixels(engine.edit(trajectory, [d], [1.0], progress=False).images[0, 0])
    run = lambda: pipe("a cat", num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),  # noqa: E731
                       output_type="pt").images[0]
    plain = run()
    with hspace.steer(pipe, d, 1.0, branch="cond"):
        steered = run()
    assert float((steered - expected).abs().max()) < 1e-4 and float((steered - plain).abs().max()) > 1e-3

    folder, sd_pipe = sd
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    d = _direction(Engine.load(str(folder), prompt="a cat", guidance=4.0), 11, 2.0)
    start = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    run = lambda: img2img("a cat", image=start, strength=0.6, num_inference_steps=10, guidance_scale=4.0,  # noqa: E731
                          generator=torch.Generator().manual_seed(3), output_type="pt").images
    delta = lambda t, h: d.at(torch.tensor([t], dtype=torch.float64)).delta[0]  # noqa: E731
    expected = _hand_hooked(img2img.unet, img2img.unet.mid_block, delta, run)
    with hspace.steer(img2img, d, 1.0):
        steered = run()
    assert float((steered - expected).abs().max()) < 1e-5 and float((steered - run()).abs().max()) > 1e-3


@pytest.mark.parametrize("offload", ["block_level", "leaf_level", "meta"])
def test_an_offloaded_denoiser_steers_as_the_plain_one(offload):
    """Group offloading (diffusers' hooks move blocks on and off the device around each call) keeps the hook point
    running: the steered image equals the one without offloading. Weights on the meta device (what sequential offload
    leaves in the module) have no fingerprint: check=True says so, check='architecture' compares the shapes."""
    from diffusers.hooks import apply_group_offloading

    pipe = tiny_sd.sd_pipeline()
    engine = Engine.from_pipeline(pipe, prompt="a cat", guidance=4.0)
    d = _direction(engine, 12, 2.0)
    if offload == "meta":
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(pipe.unet.config)
        meta_pipe = type(pipe)(**{**pipe.components, "unet": unet})
        with pytest.raises(HspaceError, match="offloaded to the meta device .* check='architecture'"):
            hspace.steer(meta_pipe, d, 1.0)
        hspace.steer(meta_pipe, d, 1.0, check="architecture").remove()
        return
    run = lambda: pipe("a cat", num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="pt").images  # noqa: E731
    with hspace.steer(pipe, d, 1.0):
        expected = run()
    apply_group_offloading(pipe.unet, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload,
                           num_blocks_per_group=1)
    with hspace.steer(pipe, d, 1.0):
        steered = run()
    assert torch.equal(steered, expected) and float((steered - run()).abs().max()) > 1e-3


def test_record_gets_h_at_the_pipelines_own_timesteps_and_pca_of_it_steers(toyfaces):
    from hspace.directions.pca import pca

    engine, pipe = toyfaces
    _with_scheduler(pipe, "DPMSolverMultistepScheduler")
    with hspace.record(pipe) as recording:
        for seed in range(3):
            _pipe_images(pipe, seed, steps=5)
    assert len(recording.generations) == 3 and recording.h.shape == (3, 5, *engine.h_shape)
    pipe.scheduler.set_timesteps(5)
    assert torch.equal(recording.timesteps, pipe.scheduler.timesteps.double())
    # h of one recorded generation is what a hand-written hook on the mid block sees
    seen = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    try:
        _pipe_images(pipe, 1, steps=5)
    finally:
        handle.remove()
    assert torch.equal(recording.generations[1].h[0], torch.cat(seen))
    result = pca(recording, 2)  # directions from my own generations, with the model's identity
    assert result.directions[0].spec == Engine.from_pipeline(pipe).space and torch.equal(result.timesteps, recording.timesteps)
    with hspace.steer(pipe, result.directions[0], 2.0):
        steered = _pipe_images(pipe, 0, steps=5)
    assert float((steered - _pipe_images(pipe, 0, steps=5)).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def transformers(tmp_path_factory):
    import tiny_transformers

    root = tmp_path_factory.mktemp("steer-transformers")
    pipes = {"dit": tiny_transformers.dit_pipeline(root / "dit"), "sd3": tiny_transformers.sd3_pipeline(root / "sd3"),
             "pixart": tiny_transformers.pixart_pipeline(root / "pixart"), "flux": tiny_transformers.flux_pipeline(root / "flux")}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return root, pipes


GUIDED = {"dit": ("1", 4.0), "sd3": ("a cat", 5.0), "pixart": ("a cat", 4.5), "flux": ("a cat", 3.5)}


def _transformer_images(pipe, kind, x_T, guidance, steps):
    from hspace.models import FluxCall

    if kind == "dit":  # DiTPipeline draws x_T from its generator: seed 3 is hspace's seed 3
        return pipe(class_labels=[1], num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
                    output_type="pt").images
    options = {"use_resolution_binning": False, "clean_caption": False} if kind == "pixart" else {}
    latents = FluxCall.pack(x_T.clone()) if kind == "flux" else x_T.clone()
    return pipe("a cat", latents=latents, num_inference_steps=steps, guidance_scale=guidance, output_type="pt", **options).images


@pytest.mark.parametrize("kind,branch", [("dit", "both"), ("dit", "cond"), ("sd3", "uncond"), ("pixart", "both"), ("flux", "both")])
def test_steer_in_transformer_pipelines_equals_engine_edit(transformers, kind, branch):
    """DiT (its null-class rows are the unconditional pass), SD3 (flow matching, guided halves), PixArt and FLUX (it
    passes t / 1000): the steered pipeline's image is Engine.edit's, within 1e-4."""
    root, pipes = transformers
    prompt, guidance = GUIDED[kind]
    engine = Engine.load(str(root / kind), prompt=prompt, guidance=guidance, **({} if kind == "flux" else {"guide_edit": branch}))
    steps = 4
    trajectory = engine.sample([3], steps, 0.0, progress=False)
    d = _direction(engine, 5, 2.0, steps=steps)
    expected = _pixels(engine.edit(trajectory, [d], [1.0], progress=False).images[0, 0])
    plain = _transformer_images(pipes[kind], kind, trajectory.x_T, guidance, steps)[0]
    with hspace.steer(pipes[kind], d, 1.0, branch=branch):
        steered = _transformer_images(pipes[kind], kind, trajectory.x_T, guidance, steps)[0]
    assert float((steered - expected).abs().max()) < 1e-4
    assert float((steered - plain).abs().max()) > 1e-3
    assert torch.equal(_transformer_images(pipes[kind], kind, trajectory.x_T, guidance, steps)[0], plain)


def test_a_branch_the_pipeline_cannot_split_is_refused(transformers):
    root, pipes = transformers
    engine = Engine.load(str(root / "flux"), prompt="a cat", guidance=3.5)
    d = _direction(engine, 5, 2.0, steps=4)
    for kind in ("flux", "pixart"):
        with pytest.raises(HspaceError, match="does not say which rows .* are the unconditional pass; steer both passes"):
            with hspace.steer(pipes[kind], d if kind == "flux" else _direction(Engine.load(str(root / kind), prompt="a cat"), 5, steps=4),
                              1.0, branch="cond"):
                _transformer_images(pipes[kind], kind, torch.randn(1, 4, 16, 16), GUIDED[kind][1], 2)



def test_a_block_cache_that_would_skip_the_hook_point_is_refused_and_works_once_removed(transformers):
    from diffusers.hooks import FirstBlockCacheConfig

    root, pipes = transformers
    pipe = pipes["flux"]
    engine = Engine.load(str(root / "flux"), prompt="a cat", guidance=3.5)
    d = _direction(engine, 5, 2.0, steps=4)
    x_T = engine.sample([3], 4, 0.0, progress=False).x_T
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with pytest.raises(HspaceError, match="has diffusers' hook 'fbc_block_hook', which skips or reuses its blocks"):
            hspace.steer(pipe, d, 1.0)
    finally:
        pipe.transformer.disable_cache()
    plain = _transformer_images(pipe, "flux", x_T, 3.5, 4)
    with hspace.steer(pipe, d, 1.0):
        assert float((_transformer_images(pipe, "flux", x_T, 3.5, 4) - plain).abs().max()) > 1e-3


def test_steer_in_a_controlnet_pipeline_equals_a_hand_written_hook(sd):
    """A ControlNet adds its residuals after the U-Net's mid block: delta-h goes in at the hook point, before them,
    exactly where a hook written by hand on the mid block puts it."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    folder, sd_pipe = sd
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd_pipe.unet, conditioning_embedding_out_channels=(16, 32))
    pipe = StableDiffusionControlNetPipeline(**sd_pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine.load(str(folder), prompt="a cat", guidance=4.0)
    d = _direction(engine, 6, 2.0)
    hint = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def images():
        return pipe("a cat", image=hint, num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                    output_type="pt").images

    plain, seen = images(), []
    handles = [pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(float(torch.as_tensor(args[1]).reshape(-1)[0]))),
               pipe.unet.mid_block.register_forward_hook(lambda _m, _a, out: out + 1.5 * d.at(torch.tensor([seen[-1]], dtype=torch.float64)).delta[0])]
    try:
        expected = images()
    finally:
        for h in handles:
            h.remove()
    with hspace.steer(pipe, d, 1.5):
        steered = images()
    assert float((steered - expected).abs().max()) < 1e-5 and float((steered - plain).abs().max()) > 1e-3
    assert torch.equal(images(), plain)


def _hand_hooked(denoiser, module, delta_of, run):
    """``run()`` with h at ``module`` moved by ``delta_of(t, h)`` for the t the denoiser was called with: the reference."""
    seen = []

    def read(_m, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen.append(float(torch.as_tensor(t).reshape(-1)[0]))

    def add(_m, _a, out):
        if isinstance(out, tuple):  # a transformer block: (text tokens, image tokens)
            return (out[0], out[1] + delta_of(seen[-1], out[1]))
        return out + delta_of(seen[-1], out)

    handles = [denoiser.register_forward_pre_hook(read, with_kwargs=True), module.register_forward_hook(add)]
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def test_directions_of_another_size_are_refused_unless_resized(sd):
    import torch.nn.functional as F

    folder, pipe = sd
    engine = Engine.load(str(folder), prompt="a cat", guidance=1.0)
    d = _direction(engine, 7, 2.0)

    def images():
        return pipe("a cat", height=64, width=64, num_inference_steps=STEPS, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                    output_type="pt").images

    with pytest.raises(HspaceError, match=r"is \(16, 16, 16\) \(another image size or another model\); .*or resize=True"):
        with hspace.steer(pipe, d, 1.0):
            images()
    grid = lambda t, h: F.interpolate(d.at(torch.tensor([t], dtype=torch.float64)).delta, size=h.shape[2:], mode="bilinear")  # noqa: E731
    expected = _hand_hooked(pipe.unet, pipe.unet.mid_block, grid, images)
    with hspace.steer(pipe, d, 1.0, resize=True):
        resized = images()
    assert float((resized - expected).abs().max()) < 1e-5 and float((resized - images()).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_steer_through_a_peft_lora(kind):
    """A LoRA loaded with PEFT (not fused) stays active: the steered image is a hand-written hook's on the LoRA'd model,
    and differs from the same steer without the LoRA."""
    from peft import LoraConfig

    import tiny_transformers
    from hspace.hooks import grid_to_tokens

    pipe = tiny_sd.sd_pipeline() if kind == "sd" else tiny_transformers.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.unet if kind == "sd" else pipe.transformer
    module, location = (pipe.unet.mid_block, "mid.out") if kind == "sd" else (denoiser.single_transformer_blocks[0], "single.0")
    shape = Engine.from_pipeline(pipe, prompt="a cat").sample_shape
    x_T = torch.randn(1, *shape, generator=torch.Generator().manual_seed(2))

    def images():
        if kind == "flux":
            return _transformer_images(pipe, "flux", x_T, 3.5, 4)
        return pipe("a cat", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="pt").images

    with hspace.record(pipe, location, branch="both") as probe:  # h's grid and the pipeline's timesteps, off one call
        images()
    d = Direction(torch.randn(4, *probe.h.shape[2:], generator=torch.Generator().manual_seed(8)) * 2, meta={"name": "d"},
                  spec=probe.spec, timesteps=probe.timesteps)
    with hspace.steer(pipe, d, 1.0, location=location):
        without_lora = images()
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))

    def delta(t, h):
        grid = d.at(torch.tensor([t * (1000 if kind == "flux" else 1)], dtype=torch.float64)).delta  # [1, C, H, W]
        return grid if h.ndim == 4 else grid_to_tokens(grid)  # FLUX's blocks hand on tokens [1, H*W, C]

    expected = _hand_hooked(denoiser, module, delta, images)
    with hspace.steer(pipe, d, 1.0, location=location):
        steered = images()
    assert float((steered - expected).abs().max()) < 1e-5
    assert float((steered - without_lora).abs().max()) > 1e-4  # the LoRA acted




def test_hspace_edit_with_a_sampler_steers_the_direction_into_diffusers_scheduler(tmp_path, capsys):
    """``hspace edit --sampler ddim`` draws the very PNGs of hspace's own eta-0 loop; another sampler draws others,
    and its scale 1 differs from its scale 0; what --sampler cannot take is an error before any pass."""
    import json

    import numpy as np
    from PIL import Image

    from hspace.cli import main

    d = tmp_path / "d.safetensors"
    assert main(["arith", "--model", "toyfaces", "--steps", "6", "--plus", "0", "--minus", "1", "-o", str(d)]) == 0
    common = ["edit", "--direction", str(d), "--seeds", "3", "4", "--steps", "6", "--scales", "0", "1.5", "--save-each"]
    assert main([*common, "--eta", "0", "--out", str(tmp_path / "own")]) == 0
    assert main([*common, "--sampler", "ddim", "--out", str(tmp_path / "ddim")]) == 0
    assert main([*common, "--sampler", "dpm++2m", "--karras", "--out", str(tmp_path / "dpm")]) == 0
    png = lambda folder, name: np.asarray(Image.open(tmp_path / folder / name)).astype(int)  # noqa: E731
    names = sorted(p.name for p in (tmp_path / "own").glob("seed*.png"))
    assert len(names) == 4 and all(np.array_equal(png("own", n), png("ddim", n)) for n in names)
    assert np.abs(png("dpm", "seed3_0_difference_1.5.png") - png("dpm", "seed3_0_difference_0.png")).max() > 10
    assert np.abs(png("dpm", "seed3_0_difference_0.png") - png("ddim", "seed3_0_difference_0.png")).max() > 0
    record = json.loads((tmp_path / "dpm" / "edit.json").read_text())
    assert (record["sampler"], record["karras"], record["directions"][0]["raw_scales"]) == ("dpm++2m", True, [0.0, 1.5])
    capsys.readouterr()
    assert main([*common, "--sampler", "ddim", "--karras", "--out", str(tmp_path / "bad")]) == 2
    assert "--karras takes one of the samplers dpm++2m, euler, unipc; 'ddim' has no Karras sigmas" in capsys.readouterr().err
    assert main([*common, "--sampler", "euler", "--asyrp", "--out", str(tmp_path / "bad")]) == 2
    assert "it does not take --asyrp" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_sampler_of_a_text_pipeline_is_its_own_and_ddim_is_hspaces_sample(sd):
    from hspace.steering import generate

    folder, _ = sd
    engine = Engine.load(str(folder), prompt="a cat", guidance=4.0)
    ours = engine.sample([3], STEPS, 0.0, progress=False).images.clamp(-1, 1)  # the pipeline's images are clamped
    assert float((generate(engine, [3], STEPS, "ddim") - ours).abs().max()) < 2e-4  # [-1, 1]: the pipelines' 1e-4 in [0, 1]
    assert float((generate(engine, [3], STEPS, "euler-a") - ours).abs().max()) > 1e-3


def test_a_second_order_scheduler_calls_twice_a_step_and_each_call_is_steered_at_its_own_t(toyfaces):
    """Heun evaluates the denoiser twice per step, the second time at the next step's t: every call gets the
    direction resampled to the t it was called with (the reference hook reads it per call, as steer does)."""
    from diffusers import HeunDiscreteScheduler

    engine, pipe = toyfaces
    d = _direction(engine, 9, 3.0)

    def heun_loop():
        scheduler = HeunDiscreteScheduler.from_config(engine.scheduler_config)
        scheduler.set_timesteps(5)
        x = torch.randn(1, *engine.sample_shape, generator=torch.Generator().manual_seed(6)) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(pipe.unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        return x

    seen = []
    expected = _hand_hooked(pipe.unet, pipe.unet.mid_block, lambda t, h: seen.append(t) or 2.0 * d.at(torch.tensor([t], dtype=torch.float64)).delta,
                            heun_loop)
    assert len(seen) == 9 and len(set(seen)) == 5  # 5 steps: 1 + 2 x 4 calls, at 5 distinct timesteps
    with hspace.steer(pipe, d, 2.0):
        steered = heun_loop()
    assert float((steered - expected).abs().max()) < 1e-5 and float((steered - heun_loop()).abs().max()) > 1e-2


def test_a_card_under_a_sampler_is_hspaces_card_for_ddim_and_its_own_for_another(tmp_path, capsys):
    """``card(..., sampler=)`` draws its held-out samples with diffusers' scheduler, the direction steered in: under
    DDIM its numbers are the card of hspace's eta-0 loop; under DPM-Solver++ it is measured, and the CLI says which."""
    import json

    from conftest import tiny_engine
    from hspace.card import card
    from hspace.cli import main

    engine = tiny_engine()
    d = _direction(engine, 13, 3.0)
    score = lambda images: {"red": images[:, 0].mean((1, 2)), "bright": images.mean((1, 2, 3))}  # noqa: E731
    options = {"n": 3, "num_steps": 6, "scales": [-2.0, 2.0], "first_seed": 40, "scorer": score}
    ours, ddim = card(d, engine, eta=0.0, **options), card(d, engine, sampler="ddim", **options)
    assert ddim.sampler == "ddim" and ours.sampler is None and ddim.scales == ours.scales
    for attribute, values in ours.change.items():
        assert max(abs(a - b) for a, b in zip(values, ddim.change[attribute])) < 1e-3, attribute
        assert max(abs(v) for v in values) > 1e-2  # the direction moved it
    assert ddim.pixel_change == pytest.approx(ours.pixel_change, abs=1e-4)
    dpm = card(d, engine, sampler="dpm++2m", **options)
    assert max(abs(a - b) for a, b in zip(dpm.change["red"], ddim.change["red"])) > 1e-4  # another sampler, another card
    with pytest.raises(HspaceError, match="'ddim' has no Karras sigmas"):
        card(d, engine, sampler="ddim", karras=True, **options)
    toy = Engine.load("toyfaces")
    _direction(toy, 14, 3.0).save(tmp_path / "d.safetensors")
    out = tmp_path / "card"
    assert main(["card", str(tmp_path / "d.safetensors"), "--model", "toyfaces", "--steps", "3", "--n", "2", "--scales", "-2", "2",
                 "--sampler", "dpm++2m", "--karras", "--out", str(out)]) == 0
    assert "under dpm++2m" in capsys.readouterr().out
    assert json.loads((out / "card.json").read_text())["sampler"] == "dpm++2m"
    assert "drawn by diffusers' dpm++2m sampler" in (out / "card.md").read_text()
