"""Conditional U-Nets (Stable Diffusion, SDXL) on tiny pipelines built in the test (tests/tiny_sd.py):
equality with diffusers' pipelines, exact replays, where delta-h goes under guidance, the Jacobian against
an explicit SVD, inversion, banks and the spec."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tiny_sd
from hspace.engine import Engine
from hspace.errors import HspaceError
from hspace.interventions import LinearEdit, Record

STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    pipes = {"sd": tiny_sd.sd_pipeline(root / "sd"), "sdxl": tiny_sd.sdxl_pipeline(root / "sdxl")}
    return root, pipes


def _noise(n: int, steps: int, seed: int) -> torch.Tensor:
    """z_t as the pipeline's DDIMScheduler draws it from one generator, step after step."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(n, 4, 16, 16, generator=gen) for _ in range(steps)], 1)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_equals_the_diffusers_pipeline(folders, kind, guidance, eta):
    root, pipes = folders
    engine = Engine.load(str(root / kind), prompt="a cat", guidance=guidance)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = engine.run(x_T, STEPS, eta, noise=_noise(2, STEPS, 5), progress=False)
    theirs = pipes[kind](
        "a cat", num_inference_steps=STEPS, guidance_scale=guidance, eta=eta, generator=torch.Generator().manual_seed(5),
        latents=x_T.clone(), output_type="latent", num_images_per_prompt=2,
    ).images
    assert float((ours - theirs).abs().max()) < 1e-4
    # and the image through the pipeline's VAE with its scaling factor
    image = pipes[kind].vae.decode(theirs / pipes[kind].vae.config.scaling_factor).sample
    assert float((engine.decode(ours) - image.detach()).abs().max()) < 1e-4


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_timestep_spacing_and_v_prediction_match_ddim(tmp_path, spacing, prediction):
    pipe = tiny_sd.sd_pipeline(tmp_path / "m", timestep_spacing=spacing, prediction_type=prediction)
    engine = Engine.load(str(tmp_path / "m"), prompt="a dog", guidance=3.0)
    pipe.scheduler.set_timesteps(5)
    assert torch.equal(engine.schedule(5).timesteps, pipe.scheduler.timesteps.long())
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    ours = engine.run(x_T, 5, 1.0, noise=_noise(1, 5, 3), progress=False)
    theirs = pipe("a dog", num_inference_steps=5, guidance_scale=3.0, eta=1.0, generator=torch.Generator().manual_seed(3),
                  latents=x_T.clone(), output_type="latent").images
    assert float((ours - theirs).abs().max()) < 1e-4


def test_prompt_is_encoded_once_and_part_of_the_spec(folders):
    root, _ = folders
    engine = Engine.load(str(root / "sd"), prompt="a cat", negative_prompt="blur", guidance=5)
    conditioner = engine.model.conditioner
    calls = []
    original = conditioner.pipeline.encode_prompt
    conditioner.pipeline.encode_prompt = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        engine.sample([0, 1], STEPS, progress=False)
        engine.sample([2], STEPS, progress=False)
        again = engine.conditioned(guide_edit="cond")  # same prompt: the cached embeddings
        other = engine.conditioned(prompt="a dog")
    finally:
        conditioner.pipeline.encode_prompt = original
    assert len(calls) == 1  # "a dog" only; "a cat" was encoded when the engine was made
    assert (engine.spec.prompt, engine.spec.negative_prompt, engine.spec.guidance, engine.spec.guide_edit) == ("a cat", "blur", 5.0, "both")
    assert again.spec.guide_edit == "cond" and other.spec.prompt == "a dog"
    assert engine.conditioned(guidance=1).spec.guide_edit is None  # one pass: nothing to choose


def test_replay_is_exact_under_each_samples_own_prompt_whatever_the_engines(folders):
    root, _ = folders
    engine = Engine.load(str(root / "sdxl"), prompt="a red car", guidance=4.0, guide_edit="cond")
    trajectory = engine.sample([3, 4], STEPS, eta=1.0, progress=False)
    assert trajectory.prompts == ["a red car"] * 2
    assert torch.equal(engine.replay(trajectory, progress=False).x0, trajectory.x0)
    assert torch.equal(Engine.load(trajectory.spec).replay(trajectory, progress=False).x0, trajectory.x0)
    other = engine.conditioned(prompt="a blue car")  # the prompt is the sample's, not the engine's
    assert torch.equal(other.replay(trajectory, progress=False).x0, trajectory.x0)
    assert not torch.equal(other.sample([3], STEPS, eta=1.0, progress=False).x0, trajectory.x0[:1])
    with pytest.raises(HspaceError, match="guidance"):  # the rest of the process must still match
        engine.conditioned(guidance=5.0).replay(trajectory, progress=False)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_samples_of_several_prompts_in_one_batch_equal_each_prompt_drawn_alone(folders, kind, tmp_path):
    root, _ = folders
    engine = Engine.load(str(root / kind), prompt="a cat", guidance=5.0)
    encoded = []
    original = engine.model.conditioner.pipeline.encode_prompt
    engine.model.conditioner.pipeline.encode_prompt = lambda *a, **k: encoded.append(1) or original(*a, **k)
    try:
        mixed = engine.sample([0, 1, 2, 3, 4], STEPS, eta=1.0, prompts=["a dog", "a cow"], progress=False)  # cycled
    finally:
        engine.model.conditioner.pipeline.encode_prompt = original
    assert mixed.prompts == ["a dog", "a cow", "a dog", "a cow", "a dog"]
    assert len(encoded) == 2  # each prompt once, for the whole batch
    for prompt, rows in (("a dog", [0, 2, 4]), ("a cow", [1, 3])):
        alone = engine.conditioned(prompt=prompt).sample([mixed.seeds[r] for r in rows], STEPS, eta=1.0, progress=False)
        # (equal up to float32 rounding that differs with the batch's size: another prompt's embedding would be far)
        assert float((mixed.x0[rows] - alone.x0).abs().max()) < 1e-4 and float((mixed.h[rows] - alone.h).abs().max()) < 1e-4
        assert float((mixed.x0[rows] - engine.sample([mixed.seeds[r] for r in rows], STEPS, eta=1.0, progress=False).x0).abs().max()) > 0.1
    # saved and loaded, indexed, concatenated with another prompt's samples, replayed: every sample keeps its prompt
    from hspace.trajectory import Trajectory

    mixed.save(tmp_path / "t.safetensors")
    loaded = Trajectory.load(tmp_path / "t.safetensors")
    assert loaded.prompts == mixed.prompts and loaded[[1, 2]].prompts == ["a cow", "a dog"]
    both = Trajectory.cat([loaded, engine.sample([9], STEPS, eta=1.0, progress=False)])
    assert both.prompts[-1] == "a cat"
    assert torch.equal(engine.conditioned(prompt="a fish").replay(loaded, progress=False).x0, mixed.x0)  # the same batches: exact
    assert float((engine.replay(both, progress=False).x0 - both.x0).abs().max()) < 1e-4  # batches of another size
    with pytest.raises(HspaceError, match="3 prompts for 2 samples"):
        engine.sample([0, 1], STEPS, prompts=["a", "b", "c"], progress=False)
    with pytest.raises(HspaceError, match="list of strings"):
        engine.sample([0, 1], STEPS, prompts=[1, 2], progress=False)


@pytest.mark.parametrize("guide_edit", ["cond", "uncond", "both"])
def test_delta_h_changes_exactly_the_passes_it_names(folders, guide_edit):
    root, _ = folders
    engine = Engine.load(str(root / "sd"), prompt="a cat", guidance=7.5, guide_edit=guide_edit)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    delta = torch.randn(1, 1, *engine.h_shape, generator=torch.Generator().manual_seed(1))
    seen = []  # the h that the first up block receives, both passes (rows 0-1 unconditional, 2-3 conditional)
    handle = engine.unet.up_blocks[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        engine.run(x_T, 1, 0.0, progress=False)
        engine.run(x_T, 1, 0.0, interventions=[LinearEdit(delta, torch.ones(2, 1))], progress=False)
    finally:
        handle.remove()
    plain, edited = seen
    change = edited - plain
    moved = {"uncond": change[:2], "cond": change[2:]}
    for name, rows in moved.items():
        if guide_edit in (name, "both"):
            assert torch.allclose(rows, delta[0, 0].expand_as(rows), atol=1e-5)
        else:
            assert torch.equal(rows, torch.zeros_like(rows))


@pytest.mark.parametrize("guide_edit", ["cond", "uncond", "both"])
def test_record_by_branch_records_exactly_that_pass_whatever_the_edit_routing(folders, guide_edit):
    """Record(branch=...) sees the pass it names (a hook on the up blocks is the reference), while an edit
    goes where guide_edit says; ctx.branch tells every intervention which pass it sees."""
    root, _ = folders
    engine = Engine.load(str(root / "sd"), prompt="a cat", guidance=7.5, guide_edit=guide_edit)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    delta = torch.randn(1, 2, *engine.h_shape, generator=torch.Generator().manual_seed(1))
    seen, branches = [], []  # the h the first up block receives: rows 0-1 unconditional, 2-3 conditional
    handle = engine.unet.up_blocks[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    records = {b: Record(branch=b) for b in ("uncond", "cond", "both")}
    spy = lambda h, ctx: branches.append(ctx.branch) or h  # noqa: E731
    try:
        engine.run(x_T, 2, 0.0, interventions=[LinearEdit(delta, torch.ones(2, 1)), spy, *records.values()], progress=False)
    finally:
        handle.remove()
    for step, h in enumerate(seen):
        assert torch.equal(records["uncond"].h[:, step], h[:2])
        assert torch.equal(records["cond"].h[:, step], h[2:])
        assert torch.equal(records["both"].h[:, step], torch.stack([h[:2], h[2:]], 1))
    assert branches == [None if guide_edit == "both" else guide_edit] * 2


def test_a_branch_that_the_model_does_not_run_is_an_error(folders, engine):
    root, _ = folders
    one_pass = Engine.load(str(root / "sd"), prompt="a cat", guidance=1.0)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    record = Record(branch="cond")
    one_pass.run(x_T, 1, 0.0, interventions=[record], progress=False)  # the one pass is the conditional one
    assert record.h.shape == (1, 1, *one_pass.h_shape)
    with pytest.raises(HspaceError, match="one, conditional pass; valid: branch None or 'cond'"):
        one_pass.run(x_T, 1, 0.0, interventions=[Record(branch="uncond")], progress=False)
    with pytest.raises(HspaceError, match="runs one pass per step"):
        engine.run(torch.zeros(1, *engine.sample_shape), 1, 0.0, interventions=[Record(branch="cond")], progress=False)
    with pytest.raises(HspaceError, match="unknown branch 'neither'"):
        Record(branch="neither")


@pytest.mark.parametrize("guide_edit", ["cond", "both"])
def test_jacobian_singular_values_match_an_explicit_svd(folders, guide_edit):
    from hspace.directions.jacobian import jacobian_directions

    root, _ = folders
    engine = Engine.load(str(root / "sd"), prompt="a cat", guidance=3.0, guide_edit=guide_edit)
    trajectory = engine.sample([7], STEPS, eta=0.0, progress=False)
    result = jacobian_directions(engine, trajectory, steps=[2], k=3, max_iter=40, tol=0, progress=False)
    half = engine.decoder_half(engine.x_t(trajectory, 2), int(engine.schedule(STEPS).timesteps[2]))
    with half.forward_mode():
        J = torch.autograd.functional.jacobian(lambda h: half(h[None])[0].flatten(), half.h[0], vectorize=True)
    S = torch.linalg.svdvals(J.reshape(J.shape[0], -1).double())[:3]
    found = result[0].singular_values.double()
    assert torch.allclose(found, S, rtol=1e-3), (found, S)


def test_ddpm_inversion_of_a_tiny_sd_image_is_exact(folders):
    from hspace.inversion import invert

    root, pipes = folders
    engine = Engine.load(str(root / "sd"), prompt="a cat", guidance=7.5)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trajectory = invert(engine, image, STEPS, 1.0, progress=False)
    target = engine.encode(image)
    replayed = engine.replay(trajectory, progress=False).x0
    assert float((replayed - target).abs().max()) < 1e-4


def test_bank_pca_and_supervised_directions_on_a_conditional_model(folders, tmp_path):
    from hspace.bank import Bank, build_bank
    from hspace.directions.pca import pca
    from hspace.directions.supervised import direction_from_scores

    root, _ = folders
    engine = Engine.load(str(root / "sd"), prompt="a cat", guidance=2.0)
    bank = build_bank(tmp_path / "bank", engine, 6, STEPS, 1.0, batch_size=4, progress=False)
    assert Bank.open(tmp_path / "bank").spec == engine.spec.with_process(STEPS, [1.0] * STEPS)
    again = Engine.load(bank.spec).sample([2], STEPS, 1.0, progress=False)
    assert float((again.h[0] - bank.h([2])[0]).abs().max()) < 1e-2  # h in float16 on disk
    result = pca(bank, 2)
    bank.set_scores("brightness", {"bright": bank.thumbnails().float().mean((1, 2, 3))})
    supervised = direction_from_scores(bank, "bright", 2, scores="brightness")
    edited = engine.edit(bank.trajectory(engine, [0]), [result.directions[0], supervised], [0.0, 2.0], progress=False).images
    assert edited.shape[:3] == (2, 2, 1)
    assert torch.equal(edited[0, 0], edited[1, 0])  # scale 0 is the sample itself
    assert not torch.equal(edited[0, 1], edited[0, 0])


def test_condition_errors(folders):
    root, _ = folders
    with pytest.raises(HspaceError, match="unconditional model"):
        Engine.load("tiny-random", prompt="a cat")
    with pytest.raises(HspaceError, match="guide_edit 'cond' needs guidance > 1"):
        Engine.load(str(root / "sd"), prompt="a cat", guidance=1.0, guide_edit="cond")
    with pytest.raises(HspaceError, match="unknown guide_edit 'half'; valid: both, cond, uncond"):
        Engine.load(str(root / "sd"), prompt="a cat", guide_edit="half")
    with pytest.raises(HspaceError, match="guidance must be a finite number"):
        Engine.load(str(root / "sd"), prompt="a cat", guidance=float("nan"))
    engine = Engine.load(str(root / "sd"))
    assert (engine.spec.prompt, engine.spec.guidance, engine.spec.guide_edit) == ("", 7.5, "both")
    with pytest.raises(HspaceError, match="unknown condition"):
        engine.conditioned(promt="x")


def test_command_line_on_a_tiny_sd_folder(folders, tmp_path, capsys):
    import json

    from hspace import Direction, Trajectory
    from hspace.cli import main

    root, _ = folders
    model = ["--model", str(root / "sd"), "--device", "cpu"]
    cond = ["--prompt", "a cat", "--guidance", "4", "--guide-edit", "cond"]
    assert main(["info", *model, *cond]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "conditional (sd)" and info["spec"]["prompt"] == "a cat" and info["spec"]["guide_edit"] == "cond"
    assert "shape [16, 8, 8]" in info["h"]
    trajectory = tmp_path / "t.safetensors"
    assert main(["sample", *model, *cond, "--steps", "3", "--seeds", "0-1", "--out", str(tmp_path / "s"), "--save-trajectory", str(trajectory)]) == 0
    saved = Trajectory.load(trajectory)
    assert saved.spec.prompt == "a cat" and saved.spec.guidance == 4.0 and saved.h.shape == (2, 3, 16, 8, 8)
    assert main(["arith", *model, *cond, "--steps", "3", "--plus", "0", "--minus", "1", "-o", str(tmp_path / "d.safetensors")]) == 0
    # the direction applies under another prompt; the trajectory's own prompt comes from the file
    assert main(["edit", "--trajectory", str(trajectory), "--direction", str(tmp_path / "d.safetensors"), "--scales", "0", "1",
                 "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    found = Direction.load(tmp_path / "d.safetensors").spec  # its space: the model and h, no prompt (it applies under any)
    assert found == replace(saved.spec.space, h_shape=(16, 8, 8)) and not hasattr(found, "prompt")
    assert main(["sample", *model, "--guide-edit", "cond", "--guidance", "1", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "needs guidance > 1" in capsys.readouterr().err
    assert main(["sample", "--model", "tiny-random", "--prompt", "a cat", "--seeds", "0", "--out", str(tmp_path / "y")]) == 2
    assert "unconditional model" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["no tokenizer/", "no text_encoder/", "no vae/", "sample_size 0", "sample_size -3", "sample_size [16]"])
def test_a_broken_pipeline_folder_is_a_message(folders, tmp_path, broken):
    import json
    import shutil

    root, _ = folders
    folder = shutil.copytree(root / "sd", tmp_path / "sd")
    if broken.startswith("no "):
        shutil.rmtree(folder / broken[3:-1])
    else:
        config = json.loads((folder / "unet" / "config.json").read_text())
        config["sample_size"] = json.loads(broken.split(" ", 1)[1])
        (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HspaceError, match="has no .* folder|sample_size"):
        Engine.load(str(folder), prompt="a cat")


def test_a_prompt_longer_than_the_tokenizer_is_cut_said_and_recorded_as_the_pipeline_cuts_it(folders, caplog):
    import logging

    root, pipes = folders
    long = "a cat sitting on a very long wall"  # letters are tokens here: far more than the tiny tokenizer's 16
    with caplog.at_level(logging.WARNING, logger="hspace.models.conditioning"):
        engine = Engine.load(str(root / "sd"), prompt=long, guidance=3.0)
    assert engine.spec.prompt != long and long.replace(" ", "").startswith(engine.spec.prompt.replace(" ", ""))
    assert any("longer than the text encoder's 14" in r.getMessage() for r in caplog.records)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = engine.run(x_T, STEPS, 0.0, progress=False)
    theirs = pipes["sd"](long, num_inference_steps=STEPS, guidance_scale=3.0, eta=0.0, latents=x_T.clone(), output_type="latent").images
    assert float((ours - theirs).abs().max()) < 1e-4  # what the pipeline makes of the long prompt
    again = Engine.load(str(root / "sd"), prompt=engine.spec.prompt, guidance=3.0)
    assert again.spec == engine.spec  # the recorded prompt is what was used
