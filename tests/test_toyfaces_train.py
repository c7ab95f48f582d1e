"""Training the toy-faces model checkpoints and resumes exactly; export writes a loadable float16 folder."""

from dataclasses import asdict

import pytest
import torch

from hspace import Engine, HspaceError
from hspace.toyfaces.train import TOYFACES_UNET_CONFIG, TrainConfig, deepen, export, train


def small(steps):
    return TrainConfig(steps=steps, batch_size=4, pool=32, warmup=2, checkpoint_every=2)


def test_resumed_training_equals_training_in_one_go(tmp_path):
    train(tmp_path / "once", small(4))
    train(tmp_path / "twice", small(2))  # a session that ended after 2 steps
    train(tmp_path / "twice", small(4))  # the same command again finishes the run
    once = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=False)
    twice = torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=False)
    assert once["step"] == twice["step"] == 4
    for key in once["ema"]:
        assert torch.equal(once["ema"][key], twice["ema"][key]), key
        assert torch.equal(once["model"][key], twice["model"][key]), key


def test_resume_with_other_settings_is_refused(tmp_path):
    train(tmp_path / "run", small(2))
    with pytest.raises(HspaceError, match="resume it with the same settings"):
        train(tmp_path / "run", TrainConfig(steps=4, batch_size=8, pool=32, warmup=2, checkpoint_every=2))


def test_export_is_a_float16_diffusers_folder_the_engine_loads(tmp_path):
    train(tmp_path / "run", small(2))
    folder = export(tmp_path / "run" / "checkpoint.pt", tmp_path / "model")
    from safetensors.torch import load_file

    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert all(w.dtype == torch.float16 for w in weights.values())
    engine = Engine.load(str(folder), device="cpu")
    assert engine.h_shape == (128, 8, 8)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["ema"]
    key = "conv_in.weight"
    assert torch.equal(engine.unet.state_dict()[key], state[key].half().float())


def test_region_weights_are_parsed_into_a_per_pixel_map():
    from hspace.toyfaces.render import region_mask
    from hspace.toyfaces.train import loss_weight_map

    assert loss_weight_map("", 32) is None
    w = loss_weight_map("mouth=3, eyes=0.5", 32)
    expected = 1 + 3 * torch.from_numpy(region_mask("mouth", 32)).float() + 0.5 * torch.from_numpy(region_mask("eyes", 32)).float()
    assert w.shape == (1, 1, 32, 32)
    assert torch.equal(w[0, 0], expected)
    assert float(w.max()) == 4.0  # the mouth region is not empty
    for bad in ("nose=2", "mouth", "mouth=-1", "mouth=x"):
        with pytest.raises(HspaceError, match=f"region weight '{bad}'"):
            loss_weight_map(bad, 32)


def test_fine_tuning_starts_from_the_init_checkpoint(tmp_path):
    train(tmp_path / "base", small(2))
    base = torch.load(tmp_path / "base" / "checkpoint.pt", weights_only=False)
    # lr 0 keeps the model at the init weights; the EMA then moves towards them at the full decay.
    config = TrainConfig(steps=2, batch_size=4, pool=32, warmup=2, checkpoint_every=2, lr=0.0, init=str(tmp_path / "base" / "checkpoint.pt"), region_weights="mouth=4")
    train(tmp_path / "ft", config)
    ft = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    for key, value in base["model"].items():
        assert torch.equal(ft["model"][key], value), key
        expected = base["ema"][key].clone()
        for _ in range(2):
            expected.lerp_(value, 1 - config.ema_decay)
        assert torch.allclose(ft["ema"][key], expected, atol=1e-7), key
    with pytest.raises(HspaceError, match="neither a checkpoint file"):
        train(tmp_path / "missing", TrainConfig(steps=2, batch_size=4, pool=32, init=str(tmp_path / "nope.pt")))


def test_bf16_autocast_computes_the_same_loss_to_bf16_precision(tmp_path):
    losses = {}
    for bf16 in (False, True):
        config = TrainConfig(steps=1, batch_size=4, pool=32, warmup=2, checkpoint_every=2, bf16=bf16)
        train(tmp_path / str(bf16), config, callback=lambda info, key=bf16: losses.setdefault(key, info["loss"]))
    assert losses[True] != losses[False]  # autocast did run in bfloat16
    assert abs(losses[True] - losses[False]) < 0.02 * losses[False]


def test_a_wider_deeper_unet_trains_exports_and_loads(tmp_path):
    config = TrainConfig(steps=2, batch_size=4, pool=32, warmup=2, checkpoint_every=2, channels="16,32,48", layers_per_block=2)
    train(tmp_path / "run", config)
    folder = export(tmp_path / "run" / "checkpoint.pt", tmp_path / "model")
    engine = Engine.load(str(folder), device="cpu")
    assert engine.h_shape == (48, 8, 8)
    assert tuple(engine.unet.config.block_out_channels) == (16, 32, 48) and engine.unet.config.layers_per_block == 2
    for bad, match in (({"channels": "32,64"}, "channels '32,64'"), ({"channels": "32,60,128"}, "multiples of 8"), ({"layers_per_block": 0}, "layers_per_block")):
        with pytest.raises(HspaceError, match=match):
            train(tmp_path / "bad", TrainConfig(steps=1, batch_size=4, pool=32, **bad))
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def perturbed_unet(layers_per_block=1, channels=(16, 32, 48)):
    """A small toy-faces-shaped U-Net (attention at 8x8) with every weight, norms included, off its init."""
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    unet = UNet2DModel(**{**TOYFACES_UNET_CONFIG, "block_out_channels": channels, "layers_per_block": layers_per_block})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet.eval()


@pytest.mark.parametrize("before, after", [(1, 2), (1, 3), (2, 3)])
def test_deepen_adds_layers_and_computes_the_same_function(before, after):
    unet = perturbed_unet(before)
    deep = deepen(unet, after).eval()
    assert deep.config.layers_per_block == after
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in unet.parameters())
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([3, 400, 999])
    with torch.no_grad():
        assert (deep(x, t).sample - unet(x, t).sample).abs().max() < 1e-6
    # The new layers are not dead: one gradient step on the deep model moves their zeroed convolutions.
    deep.train()
    deep(x, t).sample.square().mean().backward()
    assert deep.down_blocks[0].resnets[after - 1].conv2.weight.grad.abs().max() > 0
    assert deep.up_blocks[0].attentions[1].to_out[0].weight.grad.abs().max() > 0
    with pytest.raises(HspaceError, match=f"layers_per_block must be an integer >= the model's {before}"):
        deepen(unet, before - 1)


def test_training_can_start_from_a_model_folder_deepened(tmp_path):
    unet = perturbed_unet(1)
    unet.save_pretrained(tmp_path / "base")
    config = TrainConfig(steps=2, batch_size=4, pool=32, warmup=2, checkpoint_every=2, lr=0.0, init=str(tmp_path / "base"), channels="16,32,48", layers_per_block=2)
    train(tmp_path / "ft", config)
    ft = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    expected = deepen(unet, 2).state_dict()
    assert ft["model"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ft["model"][key], value), key  # lr 0: still the deepened init
        assert torch.allclose(ft["ema"][key], value), key
    with pytest.raises(HspaceError, match="has channels 16,32,48, the run 32,64,128"):
        train(tmp_path / "wide", TrainConfig(steps=2, batch_size=4, pool=32, init=str(tmp_path / "base")))
    assert not (tmp_path / "wide" / "checkpoint.pt").exists()


def test_v_weight_cap_weights_each_timestep_of_the_epsilon_loss(tmp_path):
    from diffusers import UNet2DModel

    from hspace.toyfaces.train import render_pool, timestep_weights, training_alphas, unet_config

    alphas = training_alphas()
    w = timestep_weights(alphas, 5.0)
    assert abs(float(w.mean()) - 1) < 1e-6
    assert torch.allclose(w / w[0], (1 / alphas).clamp(max=5) / (1 / alphas[0]), rtol=1e-5)
    assert float(w.max() / w.min()) == pytest.approx(5.0 * float(alphas[0]), rel=1e-5)  # the noisiest steps reach the cap
    assert torch.equal(timestep_weights(alphas, 1.0), torch.ones(len(alphas)))
    for bad in (0.5, float("nan")):
        with pytest.raises(HspaceError, match="v_weight_cap must be a finite number >= 1"):
            train(tmp_path / "bad", TrainConfig(steps=1, batch_size=4, pool=32, v_weight_cap=bad))

    # The first step's loss, recomputed by hand from the run's seeded draws.
    config = TrainConfig(steps=1, batch_size=4, pool=32, warmup=2, checkpoint_every=2, v_weight_cap=5.0)
    losses = []
    train(tmp_path / "run", config, callback=lambda info: losses.append(info["loss"]))
    torch.manual_seed(config.seed)
    model = UNet2DModel(**unet_config(config))
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.randint(0, config.pool, (4,), generator=generator)
    t = torch.randint(0, len(alphas), (4,), generator=generator)
    x0 = render_pool(config.pool, 32)[index].float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        error = (model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample - noise) ** 2
    assert losses[0] == pytest.approx(float((error * w[t].view(-1, 1, 1, 1)).mean()), rel=1e-5)
    assert losses[0] != pytest.approx(float(error.mean()), rel=1e-3)  # the weights did change the loss


def test_diverging_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_finite_checkpoint(tmp_path):
    config = TrainConfig(steps=40, batch_size=4, pool=32, warmup=0, checkpoint_every=1, lr=1e12)  # diverges for real
    losses = []
    with pytest.raises(HspaceError, match=r"training diverged: the loss at step \d+ is (nan|inf).*last finite checkpoint"):
        train(tmp_path / "run", config, callback=lambda e: losses.append(e["loss"]))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == len(losses) and all(torch.isfinite(v).all() for v in state["ema"].values() if v.is_floating_point())
    assert export(tmp_path / "run" / "checkpoint.pt", tmp_path / "model").is_dir()
    state["ema"]["conv_in.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(HspaceError, match="NaN or infinite weights .conv_in.weight"):
        export(tmp_path / "nan.pt", tmp_path / "model")
    assert Engine.load(str(tmp_path / "model"), device="cpu").h_shape == (128, 8, 8)  # the model exported before is intact


@pytest.mark.parametrize("spec", ["mouth=inf", "mouth=nan", "mouth=-1", "nose=2"])
def test_region_weights_must_be_finite_and_non_negative(spec):
    from hspace.toyfaces.train import parse_region_weights

    with pytest.raises(HspaceError, match="WEIGHT a finite number >= 0"):
        parse_region_weights(spec)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"lr": float("inf")}, {"weight_decay": -0.1}, {"ema_decay": 1.5},
                                 {"min_lr_ratio": float("nan")}, {"batch_size": 0}, {"pool": -1}, {"checkpoint_every": 0}, {"warmup": -2}])
def test_a_training_setting_out_of_range_is_refused_before_any_work(tmp_path, bad):
    with pytest.raises(HspaceError, match=f"{next(iter(bad))} must be"):
        train(tmp_path / "run", TrainConfig(**{**vars(small(2)), **bad}))
    assert not (tmp_path / "run").exists()


def small_dit(steps):
    return TrainConfig(steps=steps, batch_size=4, pool=32, warmup=2, checkpoint_every=2, arch="dit", dit_layers=2, dit_width=48)


def test_a_dit_run_resumes_exactly_and_exports_a_flow_pipeline_the_engine_loads(tmp_path):
    train(tmp_path / "once", small_dit(4))
    train(tmp_path / "twice", small_dit(2))
    train(tmp_path / "twice", small_dit(4))
    once = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=False)
    twice = torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=False)
    for key in once["ema"]:
        assert torch.equal(once["ema"][key], twice["ema"][key]), key
    export(tmp_path / "twice" / "checkpoint.pt", tmp_path / "toydit")
    folder = export(tmp_path / "once" / "checkpoint.pt", tmp_path / "toydit")  # again into the same pipeline folder
    engine = Engine.load(str(folder), device="cpu")
    assert engine.model.family == "DiT" and engine.spec.spacing == "flow:shift=1" and engine.decoder is None
    assert engine.spec.prompt == "0" and not engine.model.guided  # one class: unconditional, one pass
    assert engine.sample_shape == (3, 32, 32) and engine.h_shape == (48, 16, 16) and engine.h_location == "block.1"
    key = "transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(engine.unet.state_dict()[key], once["ema"][key].half().float())
    trajectory = engine.sample([0, 1], 3, eta=1.0, progress=False)
    assert torch.equal(engine.replay(trajectory, progress=False).x0, trajectory.x0)
    # A later session resumes from the exported (bundled) folder: model and EMA both start at its float16 weights.
    train(tmp_path / "next", TrainConfig(**{**asdict(small_dit(1)), "lr": 0.0, "init": str(folder)}))
    resumed = torch.load(tmp_path / "next" / "checkpoint.pt", weights_only=False)
    assert torch.equal(resumed["model"][key], once["ema"][key].half().float())
    with pytest.raises(HspaceError, match="is a DiT of .*num_layers.: 2.*the run asks for .*num_layers.: 3"):
        train(tmp_path / "deeper", TrainConfig(**{**asdict(small_dit(1)), "dit_layers": 3, "init": str(folder)}))
    with pytest.raises(HspaceError, match="neither a DiT checkpoint.pt, a DiT pipeline folder"):
        train(tmp_path / "nothing", TrainConfig(**{**asdict(small_dit(1)), "init": str(tmp_path)}))


def test_the_dit_is_trained_on_the_flow_matching_loss_with_logit_normal_times(tmp_path):
    """The first step's loss, recomputed by hand from the same draws: ||v(x_t, 1000 t) - (eps - x_0)||^2 with
    x_t = (1 - t) x_0 + t eps and t = sigmoid(N(0, 1))."""
    from hspace.toyfaces.train import build_model, render_pool

    config = small_dit(1)
    losses = []
    train(tmp_path / "run", config, callback=lambda info: losses.append(info["loss"]))
    torch.manual_seed(config.seed)
    model = build_model(config)
    pool = render_pool(config.pool, config.size)
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.randint(0, len(pool), (4,), generator=generator)
    x0 = pool[index].float() / 127.5 - 1
    t = torch.sigmoid(torch.randn(4, generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))  # (the label dropout's draws)
    with torch.no_grad():
        v = model(x_t, timestep=1000 * t, class_labels=torch.zeros(4, dtype=torch.long)).sample
    assert abs(float(((v - (eps - x0)) ** 2).mean()) - losses[0]) < 1e-5
    with pytest.raises(HspaceError, match="dit_width 50 must be a multiple of 48"):
        TrainConfig(arch="dit", dit_width=50)
    with pytest.raises(HspaceError, match="unknown arch 'vit'"):
        TrainConfig(arch="vit")


def test_a_low_resolution_dit_stage_trains_on_area_averaged_faces_and_starts_a_full_resolution_run(tmp_path):
    """--resolution 16: the faces are the 32 px faces averaged over 2x2 (the first loss recomputed by hand at 16 px
    with the same draws); the model keeps its 32 px size, so a full-resolution run starts from its checkpoint."""
    from hspace.toyfaces.train import build_model, render_pool

    low = TrainConfig(**{**asdict(small_dit(2)), "resolution": 16})
    losses = []
    train(tmp_path / "low", low, callback=lambda info: losses.append(info["loss"]))
    torch.manual_seed(low.seed)
    model = build_model(low)
    assert model.config.sample_size == 32
    pool = torch.nn.functional.avg_pool2d(render_pool(low.pool, 32).float(), 2).round()
    generator = torch.Generator().manual_seed(low.seed)
    index = torch.randint(0, len(pool), (4,), generator=generator)
    x0 = pool[index] / 127.5 - 1
    t = torch.sigmoid(torch.randn(4, generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    assert x0.shape == (4, 3, 16, 16)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    with torch.no_grad():
        v = model(x_t, timestep=1000 * t, class_labels=torch.zeros(4, dtype=torch.long)).sample
    assert abs(float(((v - (eps - x0)) ** 2).mean()) - losses[0]) < 1e-5
    trained = torch.load(tmp_path / "low" / "checkpoint.pt", weights_only=True)
    full = TrainConfig(**{**asdict(small_dit(3)), "init": str(tmp_path / "low" / "checkpoint.pt")})
    seen = []
    train(tmp_path / "full", full, callback=lambda info: seen.append(info["step"]))
    assert seen == [1, 2, 3]
    # the full run started from the low run's weights: one step of the optimizer moves them only a little
    started = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    key = "transformer_blocks.0.attn1.to_q.weight"
    fresh = build_model(full).state_dict()[key]
    assert (started[key] - trained["model"][key]).abs().max() < (started[key] - fresh).abs().max()
    for bad, message in ((dict(resolution=12), "even divisor of the size 32"), (dict(resolution=64), "even divisor"),
                         (dict(arch="unet", resolution=16), "for --arch dit only")):
        with pytest.raises(HspaceError, match=message):
            TrainConfig(**{**asdict(small_dit(2)), **bad})
