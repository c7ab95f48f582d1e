"""hspace bank --plan: a bank's disk, memory and passes from the model's configs alone, against real banks."""

import json
import math

import pytest

import tiny_sd
import tiny_transformers
from hspace.bank import build_bank
from hspace.cli import main
from hspace.engine import Engine
from hspace.errors import HspaceError
from hspace.plan import plan_bank

FLUX_DEV = {  # black-forest-labs/FLUX.1-dev's transformer/config.json and the VAE's depth (its configs, no weights)
    "transformer": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
                    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
                    "pooled_projection_dim": 768},
    "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 16},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    tiny_sd.sd_pipeline(root / "sd")
    tiny_sd.sdxl_pipeline(root / "sdxl")
    tiny_transformers.flux_pipeline(root / "flux")
    tiny_transformers.sd3_pipeline(root / "sd3")
    return root


@pytest.mark.parametrize("model", ["toyfaces", "toydit", "toysd", "sd", "sdxl", "flux", "sd3"])
def test_the_plan_is_the_bank_that_is_drawn(model, folders, tmp_path):
    name = model if model.startswith("toy") else str(folders / model)
    engine = Engine.load(name, device="cpu")
    plan = plan_bank(name, 3, 2, thumbnail_size=16)
    assert plan.location == engine.h_location and plan.h_shape == engine.h_shape  # from the configs on the meta device alone
    bank = build_bank(tmp_path / "bank", engine, 3, 2, 1.0, shard_size=3, thumbnail_size=16, progress=False)
    on_disk = bank.shard_path(0).stat().st_size
    assert plan.disk_total == 3 * (2 * 2 * math.prod(engine.h_shape) + 3 * 16**2 + 8)
    assert abs(on_disk - plan.disk_total) <= 0.05 * on_disk + 4096  # the shard's header: a few kB
    assert plan.parameters == sum(p.numel() for p in engine.model.unet.parameters())
    other = plan_bank(name, 3, 2, h_location=next(iter(engine.model.locations())))  # the first of its hook points
    assert other.h_shape == engine.at(other.location).h_shape


def test_flux_dev_at_1024_px_from_its_configs(tmp_path, capsys):
    for part, config in FLUX_DEV.items():
        (tmp_path / "flux" / part).mkdir(parents=True)
        (tmp_path / "flux" / part / "config.json").write_text(json.dumps(config))
    plan = plan_bank(str(tmp_path / "flux"), 1000, 28, height=1024, width=1024, dtype="bfloat16", batch_size=1)
    # one block's output at 1024 px: 4096 tokens x 3072 channels, 25 MB a step in float16, ~700 MB a sample, ~700 GB a bank
    assert plan.h_shape == (3072, 64, 64) and plan.h_bytes_per_step == 4096 * 3072 * 2
    assert abs(plan.disk_per_sample - 28 * 25.2e6) < 0.05 * 705e6 and abs(plan.disk_total - 705e9) < 0.05 * 705e9
    assert abs(plan.parameters - 11.9e9) < 0.05e9 and plan.ram_weights == 2 * plan.parameters  # FLUX.1-dev: 11.9 B, 23.8 GB in bf16
    assert plan.passes == 28_000  # embedded guidance: one pass a step
    out = tmp_path / "never"
    argv = ["bank", str(out), "--model", str(tmp_path / "flux"), "--n", "1000", "--steps", "28", "--height", "1024", "--width", "1024",
            "--dtype", "bfloat16", "--batch-size", "1", "--plan", "--pass-seconds", "1.5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "25.2 MB per step" in text and "704.7 MB per sample" in text and "704.7 GB for 1,000 samples" in text
    assert "--h-steps with at most 3 of the 28 steps (75.5 GB)" in text and "about 11.7 h at 1.5 s a pass" in text
    assert "--h-pool 2 --h-storage float8: 88.1 GB (fits)" in text and "--h-pool 4 --h-storage float8: 22.0 GB (fits)" in text
    assert "--h-storage float8: 352.3 GB;" in text  # float8 alone halves it: not enough
    assert main([*argv, "--h-pool", "2", "--h-storage", "float8"]) == 0
    assert "3.1 MB per step, 88.1 MB per sample (28 of 28 steps, float8, pooled 2x2" in capsys.readouterr().out
    assert not out.exists()  # a plan draws nothing


def test_a_plan_of_a_folder_without_a_denoiser_config_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HspaceError, match="no transformer/, unet/ or top-level config.json"):
        plan_bank(str(tmp_path / "empty"), 10, 5)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel"}))
    with pytest.raises(HspaceError, match="'NoSuchModel', which is not a diffusers model class"):
        plan_bank(str(tmp_path / "odd"), 10, 5)
