"""Diffusion transformers (DiT with class labels and DDIM, SD3 with text and flow matching) on tiny
pipelines built in the test (tests/tiny_transformers.py): equality with diffusers' pipelines, the flow
process against the scheduler's own step, exact replays, where delta-h goes under guidance, h locations,
the Jacobian against an explicit SVD, inversion, banks, PCA and the command line."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_transformers
from hspace.diffusion import Schedule
from hspace.engine import Engine
from hspace.errors import HspaceError
from hspace.interventions import LinearEdit, Record

STEPS = 4
FAMILIES = ["dit", "sd3", "pixart"]
CONDITION = {"dit": {"prompt": "1", "guidance": 4.0}, "sd3": {"prompt": "a cat", "guidance": 5.0}, "pixart": {"prompt": "a cat", "guidance": 4.5},
             "flux": {"prompt": "a cat", "guidance": 3.5}}
PIPELINE_OPTIONS = {"sd3": {}, "pixart": {"use_resolution_binning": False, "clean_caption": False}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    pipes = {"dit": tiny_transformers.dit_pipeline(root / "dit"), "sd3": tiny_transformers.sd3_pipeline(root / "sd3"),
             "pixart": tiny_transformers.pixart_pipeline(root / "pixart"), "flux": tiny_transformers.flux_pipeline(root / "flux"),
             "sd3-dynamic": tiny_transformers.sd3_pipeline(root / "sd3-dynamic", use_dynamic_shifting=True, base_image_seq_len=16,
                                                           max_image_seq_len=256)}
    return root, pipes


def _pipeline_latents(pipe, kind: str, x_T: torch.Tensor, guidance: float):
    """The pipeline's final latents and images from x_T, at its own scheduler (eta 0 for DDIM)."""
    if kind == "dit":  # DiTPipeline draws its latents from the generator and has no latent output: seed it, catch the VAE's input
        seen, decode = [], pipe.vae.decode
        pipe.vae.decode = lambda z, *a, **k: (seen.append(z), decode(z, *a, **k))[1]
        try:
            images = pipe(class_labels=[1] * len(x_T), num_inference_steps=STEPS, guidance_scale=guidance, output_type="pt",
                          generator=torch.Generator().manual_seed(3)).images
        finally:
            pipe.vae.decode = decode
        return seen[0] * pipe.vae.config.scaling_factor, images
    if kind == "flux":  # the pipeline takes and gives packed latents
        from hspace.models import FluxCall

        options = {"num_inference_steps": STEPS, "guidance_scale": guidance}
        latents = pipe("a cat", latents=FluxCall.pack(x_T.clone()), output_type="latent", **options).images
        images = pipe("a cat", latents=FluxCall.pack(x_T.clone()), output_type="pt", **options).images
        return FluxCall.unpack(latents, tuple(x_T.shape[2:])), images
    options = {"num_inference_steps": STEPS, "guidance_scale": guidance, "num_images_per_prompt": len(x_T), **PIPELINE_OPTIONS[kind]}
    latents = pipe("a cat", latents=x_T.clone(), output_type="latent", **options).images
    images = pipe("a cat", latents=x_T.clone(), output_type="pt", **options).images
    return latents, images


@pytest.mark.parametrize("kind", ["dit", "sd3", "sd3-dynamic", "pixart", "flux"])
@pytest.mark.parametrize("guided", [False, True])
def test_sample_equals_the_diffusers_pipeline(folders, kind, guided):
    root, pipes = folders
    family = kind.split("-")[0]
    guidance = CONDITION[family]["guidance"] if guided else 1.0
    engine = Engine.load(str(root / kind), prompt=CONDITION[family]["prompt"], guidance=guidance)
    x_T = torch.randn(1, *engine.sample_shape, generator=torch.Generator().manual_seed(3))  # = DiTPipeline's draw from seed 3
    ours = engine.run(x_T, STEPS, 0.0, progress=False)
    latents, images = _pipeline_latents(pipes[kind], family, x_T, guidance)
    assert float((ours - latents).abs().max()) < 1e-4 * max(1.0, float(latents.abs().max()) / 10)
    assert float(((engine.decode(ours) / 2 + 0.5).clamp(0, 1) - images).abs().max()) < 1e-4


def test_flow_schedule_is_the_pipelines_euler_step_and_the_paths_posterior(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler

    root, pipes = folders
    engine = Engine.load(str(root / "sd3-dynamic"), prompt="a cat", guidance=1.0)
    schedule = engine.schedule(5)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipes["sd3-dynamic"].scheduler.config)
    scheduler.set_timesteps(5, mu=engine.model.schedule_options(5, engine.scheduler_config)["mu"])
    assert torch.equal(schedule.timesteps.float(), scheduler.timesteps)
    assert engine.spec.spacing == "flow:dynamic" and Engine.load(str(root / "sd3")).spec.spacing == "flow:shift=3"
    x, v = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.randn(2, 4, 16, 16, dtype=torch.float64)
    for i in range(5):
        p, eps = schedule.split_output(i, x, v)
        ours = schedule.step(i, x, p, eps, 0.0, None)
        euler = x + (scheduler.sigmas[i + 1].double() - scheduler.sigmas[i].double()) * v
        assert float((ours - euler).abs().max()) < 1e-12
        # eta 1: sigma_t is the std of q(x_{t-1} | x_t, x_0) on the path x = (1 - s) x_0 + s eps, by Bayes' rule
        s, s_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        ratio = (1 - s) / (1 - s_next)
        forward_var = s**2 - ratio**2 * s_next**2
        posterior_var = s_next**2 * forward_var / s**2
        assert float(schedule.sigma(torch.ones(5, dtype=torch.float64))[i]) == pytest.approx(posterior_var**0.5, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", [*FAMILIES, "flux"])
def test_replay_is_exact_and_a_zero_edit_is_the_sample(folders, kind):
    root, _ = folders
    engine = Engine.load(str(root / kind), **CONDITION[kind])
    trajectory = engine.sample([3, 4], STEPS, eta=1.0, progress=False)
    assert torch.equal(engine.replay(trajectory, progress=False).x0, trajectory.x0)
    assert torch.equal(Engine.load(trajectory.spec).replay(trajectory, progress=False).x0, trajectory.x0)
    direction = torch.randn(1, STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(0))
    from hspace.directions.direction import Direction

    d = Direction(direction[0], spec=engine.spec)
    edited = engine.edit(trajectory, d, [0.0, 1.0], progress=False).images
    # scale 0 is the sample (decoded in another batch composition: the VAE's convolutions sum in another order)
    assert torch.allclose(edited[0, 0], engine.decode(trajectory.x0), atol=1e-5)
    assert float((edited[0, 1] - edited[0, 0]).abs().max()) > 1e-3


def _seen_by_next_block(engine):
    """A hook that keeps the image tokens the block after h receives, as h's grid: [B, D, H/p, W/p]."""
    blocks = engine.unet.transformer_blocks
    index = int(engine.h_location.split(".")[1])
    seen = []

    def pre(_module, args, kwargs):
        tokens = args[0] if args else kwargs["hidden_states"]
        seen.append(tokens.transpose(1, 2).reshape(len(tokens), -1, *engine.h_shape[1:]).clone())

    return blocks[index + 1].register_forward_pre_hook(pre, with_kwargs=True), seen


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("guide_edit", ["cond", "uncond", "both"])
def test_delta_h_changes_exactly_the_passes_it_names(folders, kind, guide_edit):
    root, _ = folders
    engine = Engine.load(str(root / kind), **CONDITION[kind], guide_edit=guide_edit, h_location="block.1")
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    delta = torch.randn(1, 1, *engine.h_shape, generator=torch.Generator().manual_seed(1))
    handle, seen = _seen_by_next_block(engine)
    records = {b: Record(branch=b) for b in ("uncond", "cond")}
    try:
        engine.run(x_T, 1, 0.0, progress=False)
        engine.run(x_T, 1, 0.0, interventions=[LinearEdit(delta, torch.ones(2, 1)), *records.values()], progress=False)
    finally:
        handle.remove()
    plain, edited = seen  # rows 0-1 unconditional, 2-3 conditional
    change = edited - plain
    for name, rows in {"uncond": change[:2], "cond": change[2:]}.items():
        if guide_edit in (name, "both"):
            assert torch.allclose(rows, delta[0, 0].expand_as(rows), atol=1e-5)
        else:
            assert torch.equal(rows, torch.zeros_like(rows))
    assert torch.equal(records["uncond"].h[:, 0], edited[:2]) and torch.equal(records["cond"].h[:, 0], edited[2:])


@pytest.mark.parametrize("kind", FAMILIES)
def test_h_locations_are_listed_checked_and_counted_from_either_end(folders, kind):
    root, _ = folders
    engine = Engine.load(str(root / kind), **CONDITION[kind])
    n = len(engine.unet.transformer_blocks)
    # DiT: the last block (the block study's winner on the toy DiT, docs/blocks/blocks.md); the others: the middle block
    assert engine.h_location == (f"block.{n - 1}" if kind == "dit" else f"block.{n // 2}")
    assert list(engine.model.locations()) == [f"block.{i}" for i in range(n)]
    last = Engine.load(str(root / kind), **CONDITION[kind], h_location="block.-1")
    assert last.h_location == f"block.{n - 1}"
    width = engine.unet.config.num_attention_heads * engine.unet.config.attention_head_dim
    assert engine.h_shape == (width, 8, 8)  # 16x16 latents in 2x2 patches
    for bad in (f"block.{n}", "mid.out", "joint.0", "block.x"):
        with pytest.raises(HspaceError, match="h location"):
            Engine.load(str(root / kind), **CONDITION[kind], h_location=bad)


@pytest.mark.parametrize("kind", [*FAMILIES, "flux"])
def test_jacobian_singular_values_match_an_explicit_svd(folders, kind):
    from hspace.directions.jacobian import jacobian_directions

    root, _ = folders
    size = {"height": 24, "width": 24} if kind == "flux" else {}  # FLUX at 24 px: h of 6x6 tokens, a Jacobian small enough to form
    engine = Engine.load(str(root / kind), prompt=CONDITION[kind]["prompt"], guidance=1.0 if kind != "flux" else 3.5, **size)
    trajectory = engine.sample([7], STEPS, eta=0.0, progress=False)
    # the last step: random transformers have flat spectra, and there the top three are furthest apart
    result = jacobian_directions(engine, trajectory, steps=[3], k=3, max_iter=40, tol=0, progress=False)
    schedule = engine.schedule(STEPS)
    half = engine.decoder_half(engine.x_t(trajectory, 3), schedule.t(3))
    with half.forward_mode():
        J = torch.autograd.functional.jacobian(lambda h: half(h[None])[0].flatten(), half.h[0], vectorize=True)
    S = torch.linalg.svdvals(J.reshape(J.shape[0], -1).double())[:3] * abs(schedule.eps_scale(3))
    found = result[0].singular_values.double()
    assert torch.allclose(found, S, rtol=1e-3), (found, S)


@pytest.mark.parametrize("kind", [*FAMILIES, "flux"])
def test_stochastic_inversion_replays_the_image_exactly(folders, kind):
    from hspace.inversion import invert

    root, _ = folders
    engine = Engine.load(str(root / kind), **CONDITION[kind])
    size = engine.image_size
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trajectory = invert(engine, image, STEPS, 1.0, progress=False)
    error = float((engine.replay(trajectory, progress=False).x0 - engine.encode(image)).abs().max())
    if kind != "flux":
        assert error < 1e-4
        return
    # A flow's last step is deterministic (sigma_next = 0) and is inverted by fixed-point iterations; on the
    # random tiny FLUX they converge slowly (docs/transformers.md): the error falls with more of them.
    more = invert(engine, image, STEPS, 1.0, fixed_point_iterations=12, progress=False)
    assert float((engine.replay(more, progress=False).x0 - engine.encode(image)).abs().max()) < error / 2


def test_deterministic_flow_inversion_comes_back_near_the_image(folders):
    from hspace.inversion import invert

    root, _ = folders
    engine = Engine.load(str(root / "sd3"), prompt="a cat", guidance=1.0)
    image = engine.decode(engine.sample([5], 10, 0.0, progress=False).x0).clamp(-1, 1)
    target = engine.encode(image)
    trajectory = invert(engine, image, 10, 0.0, fixed_point_iterations=6, progress=False)
    error = float((engine.replay(trajectory, progress=False).x0 - target).abs().max())
    assert error < 0.05 * float(target.abs().max()), error


@pytest.mark.parametrize("kind", [*FAMILIES, "flux"])
def test_bank_pca_supervised_and_regression_on_a_transformer(folders, kind, tmp_path):
    from hspace.bank import build_bank
    from hspace.directions.pca import pca

    root, _ = folders
    size = {"height": 24, "width": 24} if kind == "flux" else {}  # (FLUX's default 256 px on the tiny VAE: slow here)
    engine = Engine.load(str(root / kind), **CONDITION[kind], **size)
    bank = build_bank(tmp_path / "bank", engine, 6, STEPS, 1.0, batch_size=3, progress=False)
    result = pca(bank, 2)
    h = bank.h(list(range(6))).double()[:, 1].reshape(6, -1)
    centred = h - h.mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    found = result.directions[0].delta[1].double().flatten()
    cosine = float((found @ top) / (found.norm() * top.norm()))
    assert abs(cosine) > 0.99, cosine  # PC 1 of the bank's h (float16 on disk) at step 1
    # supervised (eq. 10 on the top and bottom 2 by a score) and regression directions from the same bank
    from hspace.directions.regression import regression_directions
    from hspace.directions.supervised import direction_from_scores

    bright = bank.thumbnails().float().mean((1, 2, 3))
    red = torch.tensor([0.0, 1, 1, 0, 1, 0])  # (a label of its own: the random models' thumbnails may vary in brightness only)
    bank.set_scores("pixels", {"bright": bright, "red": red})
    supervised = direction_from_scores(bank, "bright", 2, scores="pixels")
    order = torch.argsort(bright, descending=True).tolist()
    expected = bank.h(order[:2]).double().mean(0) - bank.h(order[-2:]).double().mean(0)
    assert torch.allclose(supervised.delta.double(), expected, atol=1e-3)
    regression = regression_directions(bank, ["bright", "red"], scores="pixels")
    assert [d.name for d in regression] == ["bright", "red"] and regression[0].h_shape == engine.h_shape
    edited = engine.edit(bank.trajectory(engine, [0]), [result.directions[0], supervised], [0.0, 3.0], progress=False).images
    assert torch.equal(edited[0, 0], edited[1, 0]) and not torch.equal(edited[0, 0], edited[0, 1])


def test_command_line_on_tiny_transformer_folders(folders, tmp_path, capsys):
    from hspace.cli import main

    root, _ = folders
    assert main(["info", "--model", str(root / "sd3"), "--prompt", "a cat"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "SD3" and info["process"].startswith("flow matching") and "shift=3" in info["process"]
    assert info["h_locations"] == {f"block.{i}": info["h_locations"][f"block.{i}"] for i in range(3)}
    assert "shape [32, 8, 8]" in info["h"]
    assert main(["sample", "--model", str(root / "sd3"), "--prompt", "a cat", "--steps", "4", "--eta", "0", "--seeds", "0-1",
                 "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("*.png"))) >= 2
    capsys.readouterr()
    assert main(["info", "--model", str(root / "flux"), "--prompt", "a cat"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "FLUX" and info["process"].endswith("dynamic") and list(info["h_locations"]) == ["joint.0", "single.0"]
    assert main(["sample", "--model", str(root / "flux"), "--prompt", "a cat", "--steps", "4", "--eta", "0", "--seeds", "0",
                 "--out", str(tmp_path / "f")]) == 0
    assert main(["sample", "--model", str(root / "dit"), "--prompt", "1", "--steps", "4", "--seeds", "0", "--out", str(tmp_path / "d")]) == 0
    assert main(["sample", "--model", str(root / "dit"), "--prompt", "zebra", "--seeds", "0", "--out", str(tmp_path / "z")]) == 2
    assert "class 'zebra' is not a class of this model" in capsys.readouterr().err
    assert main(["info", "--model", str(root / "dit"), "--prompt", "1", "--h-location", "block.9"]) == 2
    assert "valid: block.0 to block.3" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sd3", "sd3-dynamic", "pixart", "flux"])
def test_another_image_size_equals_the_pipeline_at_that_size(folders, kind, tmp_path):
    root, pipes = folders
    family = kind.split("-")[0]
    engine = Engine.load(str(root / kind), **CONDITION[family], height=24, width=40)
    assert engine.spec.size == (24, 40) and engine.image_size == (24, 40) and engine.sample_shape[1:] == (12, 20)
    x_T = torch.randn(1, *engine.sample_shape, generator=torch.Generator().manual_seed(4))
    ours = engine.run(x_T, STEPS, 0.0, progress=False)
    options = {"num_inference_steps": STEPS, "guidance_scale": CONDITION[family]["guidance"], "height": 24, "width": 40,
               "output_type": "latent", **PIPELINE_OPTIONS.get(family, {})}
    if family == "flux":
        from hspace.models import FluxCall

        theirs = FluxCall.unpack(pipes[kind]("a cat", latents=FluxCall.pack(x_T.clone()), **options).images, (12, 20))
    else:
        theirs = pipes[kind]("a cat", latents=x_T.clone(), **options).images
    assert float((ours - theirs).abs().max()) < 1e-4 * max(1.0, float(theirs.abs().max()) / 10)
    # the size is part of the process: recorded, rebuilt from the spec, refused by an engine of another size
    trajectory = engine.sample([1], STEPS, progress=False)
    assert torch.equal(Engine.load(trajectory.spec).replay(trajectory, progress=False).x0, trajectory.x0)
    with pytest.raises(HspaceError, match="size"):
        Engine.load(str(root / kind), **CONDITION[family]).replay(trajectory, progress=False)
    with pytest.raises(HspaceError, match="26 is not a multiple of 4"):
        Engine.load(str(root / kind), **CONDITION[family], height=26, width=40)
    with pytest.raises(HspaceError, match="give height and width together"):
        Engine.load(str(root / kind), **CONDITION[family], height=24)


def test_schedule_errors_name_what_is_wrong():
    with pytest.raises(HspaceError, match="dynamic shifting and needs mu"):
        Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, 4)
    with pytest.raises(HspaceError, match="stochastic_sampling"):
        Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}, 4)
    flow = Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}, 4)
    assert flow.t(0) == 1000.0 and flow.process == "flow" and float(flow.var_prev[-1]) == 0.0


@pytest.mark.parametrize("kind", [*FAMILIES, "flux"])
def test_the_editor_on_a_transformer(folders, tmp_path, kind):
    """The editor's edit, windows (for flow matching in sigma * 1000, floats) and Save; the saved direction
    re-applied in Python gives the page's image."""
    import base64

    import numpy as np

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hspace.directions.direction import Direction
    from hspace.ui.server import Editor, create_app

    root, _ = folders
    engine = Engine.load(str(root / kind), **CONDITION[kind])
    pc = Direction(torch.randn(STEPS, *engine.h_shape, generator=torch.Generator().manual_seed(0)), meta={"name": "pc1", "method": "pca"},
                   spec=engine.spec)
    editor = Editor(engine, [pc], tmp_path / "saved", steps=STEPS, eta=1.0)
    client = TestClient(create_app(editor, port=7860, token="t"), base_url="http://127.0.0.1:7860", headers={"X-Hspace-Token": "t"})
    t = editor.timesteps
    if kind in ("sd3", "flux"):
        assert t[0] == pytest.approx(1000.0) and any(x != int(x) for x in t)  # shifted sigmas: non-integer timesteps
    parts = [{"name": "pc1", "scale": 2.0, "window": [t[0], t[1]]}]
    shown = client.post("/api/edit", json={"sample": {"seed": 3}, "parts": parts, "raw": True}).json()
    assert "edited_raw" in shown, shown
    saved = client.post("/api/save", json={"name": "sd3 edit", "parts": parts}).json()["saved"]
    direction = Direction.load(editor.save_dir / saved)
    assert torch.equal(direction.delta[2:], torch.zeros_like(direction.delta[2:]))  # outside the window
    again = engine.edit(engine.sample([3], STEPS, 1.0, progress=False), [direction], [1.0], progress=False).images[0, 0, 0]
    page = torch.from_numpy(np.frombuffer(base64.b64decode(shown["edited_raw"]), dtype=np.float32).copy())
    assert torch.equal(again.flatten(), page)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "sd3"])
def test_a_bank_by_two_processes_equals_one_on_a_transformer(folders, tmp_path, monkeypatch, kind):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from hspace.cli import main

    root, _ = folders
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # equal bit for bit at the same thread count per process (docs/scale.md)
    try:
        common = ["--model", str(root / kind), "--prompt", CONDITION[kind]["prompt"], "--n", "4", "--steps", "3", "--shard-size", "2", "--batch-size", "2"]
        assert main(["bank", str(tmp_path / "one"), *common]) == 0
        env = {**os.environ, "HSPACE_NO_PROGRESS": "1"}
        two = subprocess.run([sys.executable, "-m", "hspace", "bank", str(tmp_path / "two"), *common, "--num-processes", "2"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert two.returncode == 0, two.stderr[-3000:]
    finally:
        torch.set_num_threads(before)
    names = sorted(p.name for p in (tmp_path / "one").glob("shard-*.safetensors"))
    assert len(names) == 2 and names == sorted(p.name for p in (tmp_path / "two").glob("shard-*.safetensors"))
    for name in names:
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert torch.equal(a["h"], b["h"]) and torch.equal(a["seeds"], b["seeds"])


def test_flux_packs_latents_as_the_pipeline_and_edits_its_one_pass(folders):
    from diffusers import FluxPipeline

    from hspace.models import FluxCall

    root, _ = folders
    x = torch.randn(2, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    packed = FluxCall.pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 128, 128))
    assert torch.equal(FluxCall.unpack(packed, (128, 128)), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 256, 256, 2), x)  # 256 px through the 2x VAE
    engine = Engine.load(str(root / "flux"), prompt="a cat", h_location="joint.0")
    assert list(engine.model.locations()) == ["joint.0", "single.0"] and engine.h_shape == (32, 64, 64)
    assert Engine.load(str(root / "flux"), prompt="a cat").h_location == "single.0"  # the middle of 2 blocks in forward order
    assert Engine.load(str(root / "flux"), prompt="a cat", h_location="single.-1").h_location == "single.0"
    with pytest.raises(HspaceError, match="valid: joint.0 to joint.0 .*; single.0 to single.0"):
        Engine.load(str(root / "flux"), prompt="a cat", h_location="block.0")
    with pytest.raises(HspaceError, match="no second pass to route delta-h to"):
        Engine.load(str(root / "flux"), prompt="a cat", guide_edit="cond")
    # delta-h reaches the image tokens the single block receives, in the one pass (the guidance is an embedding)
    x_T = torch.randn(1, *engine.sample_shape, generator=torch.Generator().manual_seed(1))
    delta = torch.randn(1, 1, *engine.h_shape, generator=torch.Generator().manual_seed(2))
    seen = []
    handle = engine.unet.single_transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        engine.run(x_T, 1, 0.0, progress=False)
        engine.run(x_T, 1, 0.0, interventions=[LinearEdit(delta, torch.ones(1, 1))], progress=False)
    finally:
        handle.remove()
    assert len(seen[0]) == 1  # one pass
    change = (seen[1] - seen[0]).transpose(1, 2).reshape(1, 32, 64, 64)
    assert torch.allclose(change, delta[0], atol=1e-5)


def test_offload_keeps_encoders_and_vae_on_the_cpu_and_changes_nothing(folders):
    """``Speed(offload=True)``: the same sample; the text encoders and the VAE are on the CPU between uses and
    on the engine's device while they run (on this CPU-only machine both are the CPU: the moves themselves
    are exercised on a GPU only)."""
    from hspace.speed import Speed

    root, _ = folders
    plain = Engine.load(str(root / "sd3"), prompt="a cat", guidance=5.0)
    offloaded = Engine.load(str(root / "sd3"), prompt="a cat", guidance=5.0, speed=Speed(offload=True))
    where = []
    handle = offloaded.decoder.decoder.register_forward_pre_hook(lambda m, args: where.append(next(m.parameters()).device))
    try:
        a = plain.sample([1], STEPS, 1.0, progress=False)
        b = offloaded.sample([1], STEPS, 1.0, progress=False)
        offloaded.decode(b.x0)
    finally:
        handle.remove()
    assert torch.equal(a.x0, b.x0) and torch.equal(plain.decode(a.x0), offloaded.decode(b.x0))
    assert offloaded.speed.describe() == "offload"
    encoders = offloaded.model.conditioner.encoders()
    assert len(encoders) == 2 and all(next(e.parameters()).device.type == "cpu" for e in encoders)
    assert next(offloaded.decoder.parameters()).device.type == "cpu"
    assert where and all(d == offloaded.device for d in where)  # the VAE's decoder ran on the engine's device


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_swapping_h_between_samples_on_a_transformer(folders, kind):
    """h of the donor replaces h at every step (paper Fig. 3): a sample given its own h is itself, bit for bit,
    and the recorded h of a swap is the donor's."""
    root, _ = folders
    engine = Engine.load(str(root / kind), **CONDITION[kind])
    a = engine.sample([1], STEPS, 1.0, progress=False)
    b = engine.sample([2], STEPS, 1.0, progress=False)
    assert torch.equal(engine.swap(a, a, progress=False).x0, a.x0)
    swapped = engine.swap(a, b, progress=False)
    # (under guidance "both" the passes' mean h is set to the donor's: equal up to float rounding)
    assert torch.allclose(swapped.h, b.h, atol=1e-5) and not torch.equal(swapped.x0, a.x0)


@pytest.mark.parametrize("kind", ["dit", "flux"])
def test_channels_last_and_autocast_run_on_transformers(folders, kind):
    """The speed options a transformer takes: channels_last within 1e-4 of the default; bfloat16 autocast runs,
    keeps h in float32 and stays near; --compile is refused with a message."""
    from hspace.speed import Speed

    root, _ = folders
    plain = Engine.load(str(root / kind), **CONDITION[kind])
    x_T = torch.randn(1, *plain.sample_shape, generator=torch.Generator().manual_seed(0))
    reference = plain.run(x_T, 2, 0.0, progress=False)
    nhwc = Engine.load(str(root / kind), **CONDITION[kind], speed=Speed(channels_last=True)).run(x_T, 2, 0.0, progress=False)
    assert float((nhwc - reference).abs().max()) < 1e-4 * max(1.0, float(reference.abs().max()))
    record = Record()
    fast = Engine.load(str(root / kind), **CONDITION[kind], speed=Speed(autocast="bfloat16"))
    out = fast.run(x_T, 2, 0.0, interventions=[record], progress=False)
    assert record.h.dtype == torch.float32 and 0 < float((out - reference).abs().mean()) < 0.1 * float(reference.abs().mean())
    with pytest.raises(HspaceError, match="--compile is not supported for"):
        Engine.load(str(root / kind), **CONDITION[kind], speed=Speed(compile=True))


def test_x_T_edits_keep_each_samples_own_prompt(folders):
    """Fig. 8's x_T edits on a conditional model: every copy of a sample (K directions x S scales) is generated with
    that sample's own prompt, so scale 0 replays each sample exactly (a wrong prompt changes the image)."""
    from hspace.directions.supervised import edit_x_T

    root, _ = folders
    engine = Engine.load(str(root / "dit"), device="cpu", **CONDITION["dit"])
    trajectory = engine.sample([0, 1, 2], STEPS, eta=1.0, prompts=["0", "1"], progress=False)
    assert trajectory.prompts == ["0", "1", "0"]
    delta = torch.randn(trajectory.x_T.shape[1:], generator=torch.Generator().manual_seed(0))
    images = edit_x_T(engine, trajectory, torch.stack([delta, -delta]), [0.0, 1.0], progress=False)
    assert images.shape == (2, 2, *trajectory.images.shape)
    assert (images[:, 0] - trajectory.images).abs().max() < 1e-4
    assert (images[0, 1] - trajectory.images).abs().max() > 1e-2
