"""The text-to-image workflow on tiny Stable Diffusion pipelines built in the test (tests/tiny_sd.py): banks over
many prompts, prompt-pair directions, directions across step counts, loaded pipelines, and the silent failures
of issue 26 (each made for real: a compiled U-Net, a scheduler without clip_sample, a VAE that overflows float16)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import tiny_sd
from hspace.bank import Bank, build_bank
from hspace.cli import main
from hspace.directions.direction import Direction
from hspace.directions.pca import pca
from hspace.directions.prompts import parse_pairs, prompt_direction
from hspace.engine import Engine
from hspace.errors import HspaceError
from hspace.trajectory import Trajectory

STEPS = 4
PROMPTS = ["a cat", "a dog", "a red car", "a house"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    tiny_sd.sd_pipeline(root / "sd")
    return root / "sd"


def test_the_slider_workflow_in_python(folder, tmp_path):
    """A bank over 4 prompts, PCA over it, a prompt-pair direction applied under a fifth prompt, saved, loaded
    from a copy of the model folder at another path, and used at another step count."""
    engine = Engine.load(str(folder), guidance=3.0)
    bank = build_bank(tmp_path / "bank", engine, 8, STEPS, 1.0, batch_size=8, progress=False, prompts=PROMPTS)
    assert bank.prompts == PROMPTS and bank.sample_prompts() == PROMPTS * 2
    # every sample was drawn under its own prompt: drawn again alone under that prompt, its h is the bank's
    again = engine.conditioned(prompt="a red car").sample([bank.seeds[6]], STEPS, 1.0, progress=False)
    assert float((again.h[0] - bank.h([6])[0]).abs().max()) < 1e-2  # (h in float16 on disk)
    assert float((engine.sample([bank.seeds[6]], STEPS, 1.0, progress=False).h[0] - bank.h([6])[0]).abs().max()) > 0.05
    result = pca(bank, 2)
    assert len(result.directions) == 2

    slider = prompt_direction(engine, [("a smiling cat", "a cat"), ("a smiling dog", "a dog")], 4, STEPS, 1.0, batch_size=4, progress=False)
    # eq. 10 with paired samples, recomputed here from the four pairs of samples drawn one by one
    h_plus = [engine.conditioned(prompt=p).sample([s], STEPS, 1.0, progress=False).h for s, p in zip(range(4), ["a smiling cat", "a smiling dog"] * 2)]
    h_minus = [engine.conditioned(prompt=p).sample([s], STEPS, 1.0, progress=False).h for s, p in zip(range(4), ["a cat", "a dog"] * 2)]
    expected = (torch.cat(h_plus).double() - torch.cat(h_minus).double()).mean(0)
    assert float((slider.delta - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert slider.name == "smiling" and torch.equal(slider.timesteps, engine.schedule(STEPS).timesteps.double())

    fifth = engine.conditioned(prompt="a horse")
    trajectory = fifth.sample([11, 12], STEPS, 1.0, progress=False)
    edited = fifth.edit(trajectory, slider, [0.0, 2.0], progress=False).images
    assert torch.equal(edited[0, 0], trajectory.images) and float((edited[0, 1] - edited[0, 0]).abs().max()) > 1e-3

    slider.save(tmp_path / "smiling.safetensors")
    copy = tmp_path / "moved" / "sd"
    shutil.copytree(folder, copy)
    moved = Engine.load(trajectory.spec, folder=str(copy))  # the same model by fingerprint, at another path
    loaded = Direction.load(tmp_path / "smiling.safetensors")
    assert torch.equal(moved.edit(trajectory, loaded, [2.0], progress=False).images[0, 0], edited[0, 1])
    # at 2 steps: the 2-step timesteps (501, 1) are 4-step ones, so the direction is its own vectors there
    short = moved.sample([11], 2, 1.0, progress=False)
    assert moved.schedule(2).timesteps.tolist() == [501, 1]
    by_hand = Direction(loaded.delta[[1, 3]], meta={"name": "by hand"}, spec=loaded.spec)
    assert torch.equal(moved.edit(short, loaded, [2.0], progress=False).images, moved.edit(short, by_hand, [2.0], progress=False).images)


def test_the_slider_workflow_on_the_command_line(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# subjects\n" + "\n".join(PROMPTS) + "\n\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a smiling cat | a cat\na smiling dog | a dog\n")
    common = ["--model", str(folder), "--steps", str(STEPS), "--guidance", "3"]
    assert main(["bank", str(tmp_path / "bank"), *common, "--prompts", str(prompts), "--n", "8", "--batch-size", "8"]) == 0
    assert Bank.open(tmp_path / "bank").prompts == PROMPTS
    assert main(["pca", str(tmp_path / "bank"), "--k", "2", "--out", str(tmp_path / "pca")]) == 0
    assert main(["prompt-direction", *common, "--pairs", str(pairs), "--n", "4", "-o", str(tmp_path / "smiling.safetensors")]) == 0
    assert "wrote direction 'smiling' (2 pair(s), 4 seeds" in capsys.readouterr().out
    assert main(["edit", "--model", str(folder), "--steps", "2", "--guidance", "3", "--prompt", "a horse", "--seeds", "11",
                 "--direction", str(tmp_path / "smiling.safetensors"), str(tmp_path / "pca" / "pc1.safetensors"), "--scales", "0", "2",
                 "--out", str(tmp_path / "edits")]) == 0
    assert (tmp_path / "edits" / "edit_seed11.png").is_file()
    assert main(["sample", *common, "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0-2", "--out", str(tmp_path / "s"),
                 "--save-trajectory", str(tmp_path / "s.safetensors")]) == 0
    assert Trajectory.load(tmp_path / "s.safetensors").prompts == ["a cat", "a dog", "a cat"]
    (tmp_path / "bad.txt").write_text("a smiling cat\n")
    assert main(["prompt-direction", *common, "--pairs", str(tmp_path / "bad.txt"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "line 1: 'a smiling cat' is not a pair" in capsys.readouterr().err
    assert main(["bank", str(tmp_path / "b2"), *common, "--prompts", str(tmp_path / "missing.txt"), "--n", "2"]) == 2
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "b2").exists()


def test_a_bank_over_prompts_is_resumed_and_extended_with_the_same_prompt_per_sample(folder, tmp_path):
    engine = Engine.load(str(folder), guidance=1.0)
    whole = build_bank(tmp_path / "whole", engine, 6, 2, 1.0, shard_size=2, progress=False, prompts=PROMPTS, prompt_order="random")
    part = build_bank(tmp_path / "part", engine, 4, 2, 1.0, shard_size=2, progress=False, prompts=PROMPTS, prompt_order="random")
    part = build_bank(tmp_path / "part", engine, 6, 2, 1.0, shard_size=2, progress=False, prompts=PROMPTS, prompt_order="random")
    assert part.sample_prompts() == whole.sample_prompts() and len(set(whole.sample_prompts())) > 1
    assert torch.equal(part.h(), whole.h())
    with pytest.raises(HspaceError, match="prompt_order: bank has 'random', requested 'cycle'"):
        build_bank(tmp_path / "part", engine, 8, 2, 1.0, shard_size=2, progress=False, prompts=PROMPTS)
    with pytest.raises(HspaceError, match="unknown prompt_order 'shuffle'"):
        build_bank(tmp_path / "other", engine, 2, 2, 1.0, progress=False, prompts=PROMPTS, prompt_order="shuffle")
    with pytest.raises(HspaceError, match="unconditional model: it takes no prompts"):
        build_bank(tmp_path / "u", Engine.load("tiny-random"), 2, 2, 1.0, progress=False, prompts=PROMPTS)


def test_prompt_pairs_are_checked():
    assert parse_pairs(["# c", "a b | a", "x |"]) == [("a b", "a"), ("x", "")]
    with pytest.raises(HspaceError, match="line 1: 'a | b | c' is not a pair"):
        parse_pairs(["a | b | c"])
    with pytest.raises(HspaceError, match="hold.s. no pair"):
        parse_pairs(["# only a comment"])


def test_a_loaded_pipeline_is_an_engine_and_its_generator_gives_hspaces_seed(folder, tmp_path):
    pipe = tiny_sd.sd_pipeline()
    engine = Engine.from_pipeline(pipe, prompt="a cat", guidance=1.0)
    assert Engine.load(pipe, prompt="a cat", guidance=1.0).spec == engine.spec
    # pipe(generator=torch.Generator().manual_seed(s)) draws what hspace's seed s draws (x_T, then z step by step)
    for eta in (0.0, 1.0):
        ours = engine.sample([3], STEPS, eta=eta, progress=False).x0
        theirs = pipe("a cat", num_inference_steps=STEPS, guidance_scale=1.0, eta=eta, generator=torch.Generator().manual_seed(3),
                      output_type="latent").images
        assert float((ours - theirs).abs().max()) < 1e-4
    # a diffusers-style callback_on_step_end sees the latents after every step, as the pipeline's does
    from hspace.progress import step_end_callback

    seen, theirs_seen = [], []
    engine.sample([3], STEPS, eta=0.0, progress=False, callback=step_end_callback(lambda p, i, t, kw: seen.append((i, t, kw["latents"].clone())), pipe))
    pipe("a cat", num_inference_steps=STEPS, guidance_scale=1.0, eta=0.0, generator=torch.Generator().manual_seed(3), output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: theirs_seen.append((i, int(t), kw["latents"].clone())) or kw)
    assert [(i, t) for i, t, _ in seen] == [(i, t) for i, t, _ in theirs_seen]
    assert max(float((a[2] - b[2]).abs().max()) for a, b in zip(seen, theirs_seen)) < 1e-4
    sized = Engine.from_pipeline(pipe, prompt="a cat", guidance=3.0, height=48, width=64)  # the pipelines' height/width
    ours = sized.sample([2], STEPS, eta=1.0, progress=False).x0
    theirs = pipe("a cat", height=48, width=64, num_inference_steps=STEPS, guidance_scale=3.0, eta=1.0,
                  generator=torch.Generator().manual_seed(2), output_type="latent").images
    assert sized.sample_shape == (4, 24, 32) and float((ours - theirs).abs().max()) < 1e-4
    trajectory = engine.sample([0], STEPS, progress=False)
    with torch.no_grad():  # a LoRA fused into the U-Net (what fuse_lora does: W += B A) is another model
        weight = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
        weight += 0.1 * torch.randn(weight.shape[0], 2) @ torch.randn(2, weight.shape[1])
    fused = Engine.from_pipeline(pipe, prompt="a cat", guidance=1.0)
    assert fused.spec.fingerprint != engine.spec.fingerprint
    with pytest.raises(HspaceError, match="model fingerprint"):
        fused.replay(trajectory, progress=False)
    with pytest.raises(HspaceError, match="a loaded diffusers pipeline, got a str"):
        Engine.from_pipeline("runwayml/stable-diffusion-v1-5")
    with pytest.raises(HspaceError, match="model must be a name, a folder, a hub id, a Spec, a direction's Space or a loaded diffusers pipeline; got a int"):
        Engine.load(5)


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_a_denoiser_compiled_by_its_user_is_refused_not_silently_unedited(how):
    pipe = tiny_sd.sd_pipeline()
    if how == "torch.compile":
        pipe.unet = torch.compile(pipe.unet)
    else:
        pipe.unet.compile()
    with pytest.raises(HspaceError, match="was compiled .* --compile"):
        Engine.from_pipeline(pipe, prompt="a cat")


def test_a_scheduler_without_clip_sample_does_not_clip_latents_and_a_foreign_scheduler_is_named(folder, tmp_path, caplog, capsys):
    from diffusers import PNDMScheduler

    copy = tmp_path / "pndm"
    shutil.copytree(folder, copy)
    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                         skip_prk_steps=True)  # the tiny pipeline's schedule, as SD's default scheduler
    assert "clip_sample" not in pndm.config  # PNDM's config has no such key
    pndm.save_config(copy / "scheduler")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    with caplog.at_level(logging.WARNING, logger="hspace"):
        engine = Engine.load(str(copy), prompt="a cat", guidance=1.0)
    assert engine.schedule(STEPS).clip_sample is None  # not DDIM's default clip to +-1
    assert "the model's scheduler is PNDMScheduler; hspace runs its own sampler" in caplog.text
    explicit = Engine.load(str(folder), prompt="a cat", guidance=1.0)  # the DDIM config, clip_sample false
    assert torch.equal(engine.sample([1], STEPS, progress=False).x0, explicit.sample([1], STEPS, progress=False).x0)
    assert main(["info", "--model", str(copy), "--prompt", "a cat"]) == 0
    process = json.loads(capsys.readouterr().out)["process"]
    assert "no clipping" in process and "NOTE: the model's scheduler is PNDMScheduler" in process


def test_a_vae_that_overflows_float16_decodes_in_float32_when_its_config_says_force_upcast():
    pipe = tiny_sd.sd_pipeline()
    with torch.no_grad():  # activations of ~1e5 after the first convolution: beyond float16, fine in float32
        pipe.vae.decoder.conv_in.weight *= 3e4
        pipe.vae.decoder.conv_in.bias *= 3e4
    x0 = Engine.from_pipeline(pipe, prompt="a cat", guidance=1.0).sample([0], 2, progress=False)
    import copy

    with torch.no_grad():  # the overflow is real: the VAE itself in float16 decodes NaN
        assert not bool(torch.isfinite(copy.deepcopy(pipe.vae).half().decode(x0.x0.half() / 0.18215).sample).all())
    assert pipe.vae.config.force_upcast
    half = Engine.from_pipeline(pipe, prompt="a cat", guidance=1.0, dtype="float16")
    assert half.model.codec.dtype == torch.float32
    assert float((half.decode(x0.x0) - x0.images).abs().max()) < 1e-5  # the float32 decode (batch rounding aside)
    pipe.vae.register_to_config(force_upcast=False)
    with pytest.raises(HspaceError, match="decoded NaN or infinite values in float16"):
        Engine.from_pipeline(pipe, prompt="a cat", guidance=1.0, dtype="float16").decode(x0.x0)


def test_jacobian_directions_of_a_sample_are_taken_under_its_own_prompt(folder):
    from hspace.directions.jacobian import jacobian_directions

    engine = Engine.load(str(folder), prompt="a cat", guidance=1.0)
    dog = engine.conditioned(prompt="a dog")
    trajectory = dog.sample([5], STEPS, eta=1.0, progress=False)  # recorded under "a dog"
    mine = jacobian_directions(engine, trajectory, steps=[2], k=2, max_iter=15, tol=0, progress=False)[0].singular_values
    theirs = jacobian_directions(dog, trajectory, steps=[2], k=2, max_iter=15, tol=0, progress=False)[0].singular_values
    assert torch.allclose(mine, theirs, rtol=1e-4)  # the engine's prompt ("a cat") does not enter


def test_vae_slicing_decodes_one_image_per_call_and_tiling_tiles(folder):
    """``Speed(vae_slicing=True)``: every VAE call sees one image (counted by a forward hook on the VAE's decoder and
    encoder), with the images of a batched decode; ``vae_tiling``: the VAE's own tiling, used once an image exceeds
    the tile (made small here), blended where tiles meet; refused for a model without a VAE."""
    from hspace.speed import Speed

    plain = Engine.load(str(folder), prompt="a cat", guidance=1.0)
    sliced = Engine.load(str(folder), prompt="a cat", guidance=1.0, speed=Speed(vae_slicing=True))
    assert sliced.speed.describe() == "vae_slicing"
    x0 = plain.sample([1, 2, 3], STEPS, 1.0, progress=False).x0
    seen = {"decoder": [], "encoder": []}
    hooks = [getattr(sliced.decoder, part).register_forward_hook(lambda m, args, out, part=part: seen[part].append(len(args[0])))
             for part in seen]
    try:
        images = sliced.decode(x0)
        latents = sliced.encode(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"decoder": [1, 1, 1], "encoder": [1, 1, 1]}
    assert torch.allclose(images, plain.decode(x0), atol=1e-5) and torch.allclose(latents, plain.encode(images), atol=1e-5)

    tiled = Engine.load(str(folder), prompt="a cat", guidance=1.0, speed=Speed(vae_tiling=True))
    vae = tiled.decoder
    assert vae.use_tiling
    # the tiny VAE's images are below diffusers' default tile (512 px): tiling only starts above it, so shrink the tile
    size = images.shape[-1]
    vae.tile_sample_min_size, vae.tile_latent_min_size = size // 2, x0.shape[-1] // 2
    calls = []
    hook = vae.decoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape[-2:])))
    try:
        tiles = tiled.decode(x0)
    finally:
        hook.remove()
    assert len(calls) > 1 and all(c[0] <= x0.shape[-2] // 2 for c in calls)  # several tiles, each at most the tile size
    assert tiles.shape == images.shape and bool(torch.isfinite(tiles).all()) and not torch.equal(tiles, images)
    with pytest.raises(HspaceError, match="no VAE"):
        Engine.load("tiny-random", speed=Speed(vae_tiling=True))


def test_precomputed_prompt_embeddings_stand_for_a_prompt(folder):
    """diffusers' ``prompt_embeds`` / ``negative_prompt_embeds``: the embeddings of "a cat" draw what the text draws,
    exactly; their label is what a trajectory records, and a replay needs the same tensors."""
    text = Engine.load(str(folder), prompt="a cat", negative_prompt="blurry", guidance=3.0)
    pipe = text.components.conditioner.pipeline
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True, "blurry")
    embedded = Engine.load(str(folder), prompt_embeds=cond, negative_prompt_embeds=uncond, guidance=3.0)
    label = embedded.spec.prompt
    assert label.startswith("<prompt embeds ") and embedded.spec.negative_prompt is None
    a, b = text.sample([1, 2], STEPS, 1.0, progress=False), embedded.sample([1, 2], STEPS, 1.0, progress=False)
    assert torch.equal(a.x0, b.x0) and b.prompts == [label, label]
    # the negative side from text when only prompt_embeds are given (the pipelines' rule), and other tensors are another prompt
    half = Engine.load(str(folder), prompt_embeds=cond, negative_prompt="blurry", guidance=3.0)
    one = text.sample([1], STEPS, 1.0, progress=False).x0  # (the same batch shape: exactly equal)
    assert torch.equal(half.sample([1], STEPS, 1.0, progress=False).x0, one)
    other = embedded.prompt_embeds(1.5 * cond, uncond)
    assert other != label and not torch.allclose(embedded.sample([1], STEPS, 1.0, progress=False, prompts=[other]).x0, one, atol=1e-3)
    # per-sample prompts mix labels and text
    mixed = embedded.sample([1, 2], STEPS, 1.0, progress=False, prompts=[label, "a dog"])
    dog = Engine.load(str(folder), prompt="a dog", guidance=3.0).sample([2], STEPS, 1.0, progress=False)
    assert torch.allclose(mixed.x0[0], a.x0[0], atol=1e-5) and torch.allclose(mixed.x0[1], dog.x0[0], atol=1e-5)

    # a replay: the spec names the label; without the tensors it is refused, with them it replays exactly
    with pytest.raises(HspaceError, match="precomputed embeddings that this engine does not hold"):
        Engine.load(b.spec)
    again = Engine.load(b.spec, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert torch.equal(again.replay(b, progress=False).x0, b.x0)
    with pytest.raises(HspaceError, match="not the spec's prompt"):
        Engine.load(b.spec, prompt_embeds=cond)

    for options, message in [
        ({"prompt": "a cat", "prompt_embeds": cond}, "not both"),
        ({"prompt_embeds": cond[:, :, :5]}, r"prompt_embeds has shape \(1, \d+, 5\); valid: \[1, L, \d+\]"),
        ({"prompt_embeds": cond * float("nan")}, "NaN"),
        ({"negative_prompt_embeds": uncond}, "prompt_embeds is needed"),
    ]:
        with pytest.raises(HspaceError, match=message):
            Engine.load(str(folder), guidance=3.0, **options)
    with pytest.raises(HspaceError, match="takes no prompt embeddings"):
        Engine.load("tiny-random", prompt_embeds=cond)
    xl = tiny_sd.sdxl_pipeline()
    with torch.no_grad():
        xl_cond = xl.encode_prompt("a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    with pytest.raises(HspaceError, match="SDXL pipeline needs pooled_prompt_embeds"):
        Engine.from_pipeline(xl, prompt_embeds=xl_cond, guidance=1.0)
