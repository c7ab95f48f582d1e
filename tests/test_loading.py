"""Loading models: built-in names, U-Net folders, latent pipeline folders, hub ids offline."""

import json

import pytest
import torch

from hspace import Engine, HspaceError
from hspace.loading import CELEBAHQ_SCHEDULER_CONFIG

from conftest import tiny_unet


def _write_scheduler(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(CELEBAHQ_SCHEDULER_CONFIG))


def test_unet_folder_round_trip(tmp_path, engine):
    """A saved U-Net folder (the layout of google/ddpm-ema-celebahq-256) samples exactly as the original."""
    tiny_unet().save_pretrained(tmp_path / "model")
    _write_scheduler(tmp_path / "model")
    loaded = Engine.load(str(tmp_path / "model"), device="cpu")
    assert loaded.h_shape == engine.h_shape
    a = loaded.sample([1, 2], num_steps=3)
    b = engine.sample([1, 2], num_steps=3)
    assert torch.equal(a.x0, b.x0)


def test_latent_pipeline_folder_decodes_through_its_autoencoder(tmp_path):
    """model_index.json + unet/ + vqvae/ + scheduler/ (the layout of CompVis/ldm-celebahq-256)."""
    from diffusers import VQModel

    folder = tmp_path / "ldm"
    tiny_unet(sample_size=8, in_channels=3).save_pretrained(folder / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        VQModel(
            in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, num_vq_embeddings=16,
        ).save_pretrained(folder / "vqvae")
    _write_scheduler(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline"}))
    engine = Engine.load(str(folder), device="cpu")
    assert engine.decoder is not None and engine.sample_shape == (3, 8, 8)
    traj = engine.sample([0], num_steps=2)
    assert traj.x0.shape == (1, 3, 8, 8)
    assert traj.images.shape == (1, 3, 16, 16)
    scale = engine.decoder.config.scaling_factor  # as LDMPipeline: latents / scaling_factor, then decode
    with torch.no_grad():
        assert torch.allclose(traj.images, engine.decoder.decode(traj.x0 / scale).sample, atol=1e-5)


def test_builtin_model_by_name():
    engine = Engine.load("tiny-random", device="cpu")
    assert engine.h_shape == (64, 8, 8) and engine.sample_shape == (3, 32, 32)


def test_folder_without_scheduler_is_a_clear_error(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "m")
    with pytest.raises(HspaceError, match="no scheduler_config.json"):
        Engine.load(str(tmp_path / "m"))


def test_folder_that_is_no_model(tmp_path):
    with pytest.raises(HspaceError, match="is not a diffusers model folder"):
        Engine.load(str(tmp_path))


def test_unknown_name_lists_the_builtins():
    with pytest.raises(HspaceError, match=r"'nonsense'.*tiny-random"):
        Engine.load("nonsense")


def test_uncached_hub_id_offline_says_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(HspaceError, match=r"'google/ddpm-ema-celebahq-256'.*--local-dir DIR.*--model DIR"):
        Engine.load("google/ddpm-ema-celebahq-256")


@pytest.mark.parametrize("kwargs, message", [({"device": "gpu9"}, "unknown device 'gpu9'"), ({"dtype": "int8"}, "unknown dtype 'int8'")])
def test_bad_device_and_dtype(kwargs, message):
    with pytest.raises(HspaceError, match=message):
        Engine.load("tiny-random", **kwargs)
