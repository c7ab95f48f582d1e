"""Training the toy-faces model checkpoints and resumes exactly; export writes a loadable float16 folder."""

import pytest
import torch

from hspace import Engine, HspaceError
from hspace.toyfaces.train import TrainConfig, export, train


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
