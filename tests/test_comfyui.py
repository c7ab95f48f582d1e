"""hspace's ComfyUI core (hspace.comfyui) and node pack (integrations/comfyui) against a stand-in written from
ComfyUI's calling convention (comfy_standin.py): the patched model equals the reference addition (a forward hook on
the same module); clones are isolated; routing by cond_or_uncond with 1, 2 and 3 chunks in every order; windows from
percents; FLUX's token slices; bad wiring is a clear error. The real ComfyUI: tests/test_comfyui_contract.py."""

from __future__ import annotations

import importlib
import itertools
import sys
import types

import pytest
import torch

import comfy_standin as comfy
from conftest import tiny_unet
from hspace.comfyui import apply_direction, chunk_rows, family_of, percent_window
from hspace.directions.direction import Direction
from hspace.errors import HspaceError
from hspace.spec import FREE, Spec


def _direction(h_shape, location, steps=5, seed=0, timesteps=None):
    delta = torch.randn(steps, *h_shape, generator=torch.Generator().manual_seed(seed))
    spec = Spec("tiny-test", h_location=location)
    return Direction(delta, meta={"name": f"d{seed}"}, spec=spec, timesteps=timesteps if timesteps is not None else torch.linspace(999, 0, steps).round())


@pytest.fixture(scope="module")
def unet_patcher():
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    sampling = comfy.DiscreteSampling(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)
    return comfy.ModelPatcher(comfy.Model(comfy.UNetModel(unet), sampling)), unet


@pytest.mark.parametrize("chunks", [[0], [1], [0, 1], [1, 0], *itertools.permutations([0, 1, 1]), *itertools.permutations([0, 0, 1])])
def test_rows_are_routed_by_cond_or_uncond_in_any_order_and_number(chunks):
    rows = chunk_rows(chunks, 2 * len(chunks), "cond")
    assert rows.tolist() == [c == 0 for c in chunks for _ in range(2)]
    assert chunk_rows(chunks, 2 * len(chunks), "uncond").tolist() == [c == 1 for c in chunks for _ in range(2)]
    assert chunk_rows(chunks, 2 * len(chunks), "all").all()
    with pytest.raises(HspaceError, match=r"cannot split a batch of 5 rows by cond_or_uncond"):
        chunk_rows([0, 1], 5, "cond")
    with pytest.raises(HspaceError, match="unknown branch 'both'; valid: all, cond, uncond"):
        chunk_rows(chunks, 2, "both")


def test_percent_windows_are_the_models_own_timesteps(unet_patcher):
    patcher, _ = unet_patcher
    sampling = patcher.model.model_sampling
    assert percent_window(0.0, 1.0, sampling.percent_to_sigma, sampling.timestep) is None
    hi, lo = percent_window(0.2, 0.7, sampling.percent_to_sigma, sampling.timestep)
    assert (hi, lo) == (float(sampling.timestep(torch.tensor(sampling.percent_to_sigma(0.2)))),
                        float(sampling.timestep(torch.tensor(sampling.percent_to_sigma(0.7)))))
    assert abs(hi - 0.8 * 999) <= 1 and abs(lo - 0.3 * 999) <= 1  # percent p of the schedule is timestep (1 - p) 999
    flow = comfy.FlowSampling()
    assert percent_window(0.25, 1.0, flow.percent_to_sigma, flow.timestep, 1000.0) == (750.0, 0.0)
    with pytest.raises(HspaceError, match="start_percent 0.8 is after end_percent 0.3"):
        percent_window(0.8, 0.3, flow.percent_to_sigma, flow.timestep)
    with pytest.raises(HspaceError, match="end_percent must be a number from 0 to 1, got 1.5"):
        percent_window(0.0, 1.5, flow.percent_to_sigma, flow.timestep)


def _hooked(unet, module, delta_of, run):
    """``run()`` with ``delta_of(h)`` added at ``module``'s output by a torch forward hook: the reference."""
    handle = module.register_forward_hook(lambda _m, _a, out: out + delta_of(out))
    try:
        return run()
    finally:
        handle.remove()


@pytest.mark.parametrize("location", ["mid.out", "mid.in"])
def test_the_patched_unet_adds_the_direction_where_a_hook_on_the_same_module_does(unet_patcher, location):
    patcher, unet = unet_patcher
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = float(patcher.model.model_sampling.percent_to_sigma(0.4))
    t = patcher.model.model_sampling.timestep(torch.tensor(sigma))
    plain = comfy.call(patcher, [x[:1], x[1:]], sigma, [0, 1])
    assert torch.allclose(plain, unet(x, t.expand(2)).sample, atol=1e-5)  # the stand-in is the U-Net
    module = unet.mid_block if location == "mid.out" else unet.down_blocks[-1]
    d = _direction((32, 8, 8), location)  # h of the tiny U-Net at 16 px, before and after its mid block
    patched = apply_direction(patcher, [d], [1.5], units="raw", branch="cond")
    assert "patches" not in patcher.model_options["transformer_options"]  # the input MODEL is untouched
    out = comfy.call(patched, [x[:1], x[1:]], sigma, [0, 1])
    at = d.at(torch.tensor([float(t)], dtype=torch.float64)).delta[0] * 1.5
    rows = torch.tensor([True, False])

    def delta(h):
        return torch.where(rows[:, None, None, None], at, torch.zeros_like(at)) if not isinstance(h, tuple) else None

    if location == "mid.out":
        expected = _hooked(unet, module, delta, lambda: unet(x, t.expand(2)).sample)
    else:  # the last down block returns (h, residuals): h after the skip is its first element
        handle = module.register_forward_hook(lambda _m, _a, out: (out[0] + delta(out[0]), out[1]))
        try:
            expected = unet(x, t.expand(2)).sample
        finally:
            handle.remove()
    assert float((out - expected).abs().max()) < 1e-5 and float((out[0] - plain[0]).abs().max()) > 1e-3
    assert torch.equal(out[1], plain[1])  # the uncond chunk is not edited
    reversed_ = comfy.call(patched, [x[1:], x[:1]], sigma, [1, 0])  # the same rows in the other order: cond is now row 1
    assert torch.allclose(reversed_[1], out[0], atol=1e-5) and torch.equal(reversed_[0], plain[1])
    window = apply_direction(patcher, [d], [1.5], units="raw", start_percent=0.6)  # the call at 40% is before the window
    assert torch.equal(comfy.call(window, [x[:1], x[1:]], sigma, [0, 1]), plain)


def test_stacked_directions_add_and_strength_zero_is_the_plain_model(unet_patcher):
    patcher, unet = unet_patcher
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = float(patcher.model.model_sampling.percent_to_sigma(0.5))
    a, b = _direction((32, 8, 8), "mid.out", seed=1), _direction((32, 8, 8), "mid.out", seed=2)
    chained = apply_direction(apply_direction(patcher, [a], [1.0], units="raw"), [b], [-0.5], units="raw")
    together = apply_direction(patcher, [a * 1.0 + b * -0.5], [1.0], units="raw")
    assert torch.allclose(comfy.call(chained, [x], sigma, [0]), comfy.call(together, [x], sigma, [0]), atol=1e-5)
    assert torch.equal(comfy.call(apply_direction(patcher, [a], [0.0], units="raw"), [x], sigma, [0]), comfy.call(patcher, [x], sigma, [0]))
    wrong = apply_direction(patcher, [_direction((32, 4, 4), "mid.out")], [1.0], units="raw")
    with pytest.raises(HspaceError, match=r"h of shape \(32, 4, 4\), but this model's h at 'mid.out' is \(32, 8, 8\)"):
        comfy.call(wrong, [x], sigma, [0])
    with pytest.raises(HspaceError, match="has no card"):
        apply_direction(patcher, [a], [1.0], units="effect")


class MMDiT(comfy.Flux):
    """SD3's MMDiT in ComfyUI takes the same ("double_block", N) replace patch: hspace's block.N."""


@pytest.mark.parametrize("location", ["joint.1", "single.0", "single.1", "block.1"])
def test_flux_and_sd3_blocks_move_the_image_tokens_only(location):
    width, grid, n_txt = 8, (3, 2), 4
    model = MMDiT(width) if location.startswith("block") else comfy.Flux(width)
    patcher = comfy.ModelPatcher(comfy.Model(model, comfy.FlowSampling()))
    img = torch.randn(2, grid[0] * grid[1], width, generator=torch.Generator().manual_seed(3))
    txt = torch.randn(2, n_txt, width, generator=torch.Generator().manual_seed(4))
    d = _direction((width, *grid), location, timesteps=torch.linspace(1000, 0, 5))
    sigma = 0.55
    at = d.at(torch.tensor([sigma * 1000], dtype=torch.float64)).delta[0] * 2.0  # [C, H, W]
    tokens = at.reshape(width, -1).T  # row-major patches, as hspace's grid_to_tokens
    kind, index = location.split(".")
    block = (model.double_blocks if kind in ("joint", "block") else model.single_blocks)[int(index)]
    if kind in ("joint", "block"):
        hook = lambda _m, _a, out: (out[0] + tokens, out[1])  # noqa: E731
    else:
        hook = lambda _m, _a, out: (torch.cat([out[0][:, :n_txt], out[0][:, n_txt:n_txt + tokens.shape[0]] + tokens], 1), None)  # noqa: E731
    handle = block.register_forward_hook(hook)
    try:
        expected = comfy.call(patcher, [img], sigma, [0, 0], txt=[txt])
    finally:
        handle.remove()
    patched = apply_direction(patcher, [d], [2.0], units="raw")
    out = comfy.call(patched, [img], sigma, [0, 0], txt=[txt])
    assert float((out - expected).abs().max()) < 1e-6 and float((out - comfy.call(patcher, [img], sigma, [0, 0], txt=[txt])).abs().max()) > 1e-3
    assert "patches_replace" not in patcher.model_options["transformer_options"]
    valid = "block.N" if kind == "block" else "joint.N or single.N"
    with pytest.raises(HspaceError, match=f"not on a ComfyUI patch point of {'SD3' if kind == 'block' else 'FLUX'}; valid: {valid}"):
        apply_direction(patcher, [_direction((width, *grid), "mid.out")], [1.0], units="raw")


def test_an_unknown_model_family_is_a_clear_error():
    with pytest.raises(HspaceError, match="do not know a Linear model; they apply directions to SD 1.x/2.x and SDXL U-Nets"):
        family_of(torch.nn.Linear(2, 2))
    assert family_of(comfy.Flux()) == "flux"


def test_the_node_pack_loads_a_direction_from_models_hspace_and_applies_it(tmp_path, monkeypatch, unet_patcher):
    """The pack as ComfyUI imports it: a ``folder_paths`` module (ComfyUI's, here a stand-in module) registers
    models/hspace; Load lists and loads its files (subfolders too) with a description; Apply returns a patched
    clone; hspace's errors reach ComfyUI as ValueErrors with the message."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "integrations"
    models = tmp_path / "models"
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir, folder_paths.folder_names_and_paths = str(models), {}
    folder_paths.get_filename_list = lambda name: sorted(str(p.relative_to(models / name)) for p in (models / name).rglob("*.safetensors"))
    folder_paths.get_full_path = lambda name, file: str(models / name / file)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("comfyui", None)
    pack = importlib.import_module("comfyui")
    assert folder_paths.folder_names_and_paths["hspace"] == ([str(models / "hspace")], {".safetensors"})
    (models / "hspace" / "pca").mkdir(parents=True)
    d = _direction((32, 8, 8), "mid.out", seed=5)
    d.save(models / "hspace" / "pca" / "pc1.safetensors")
    load, apply = pack.NODE_CLASS_MAPPINGS["HspaceLoadDirection"](), pack.NODE_CLASS_MAPPINGS["HspaceApplyDirection"]()
    assert pack.HspaceLoadDirection.INPUT_TYPES()["required"]["direction"][0] == ["pca/pc1.safetensors"]
    loaded, info = load.load("pca/pc1.safetensors")
    assert torch.equal(loaded.delta, d.delta) and "h at mid.out, shape [32, 8, 8], 5 steps" in info and "no card (raw units)" in info
    patcher, _ = unet_patcher
    (model,) = apply.apply(patcher, loaded, 1.0, "auto", 0.0, 1.0, "all")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(comfy.call(model, [x], 3.0, [0]), comfy.call(patcher, [x], 3.0, [0]))
    with pytest.raises(ValueError, match="hspace: start_percent 0.9 is after end_percent 0.1"):
        apply.apply(patcher, loaded, 1.0, "auto", 0.9, 0.1, "all")
    free = Direction(torch.randn(5, 32, 8, 8), meta={"name": "free"}, spec=FREE, timesteps=torch.linspace(999, 0, 5).round())
    (model,) = apply.apply(patcher, free, 1.0, "raw", 0.0, 1.0, "all")  # no location: the U-Net's mid.out
    assert not torch.equal(comfy.call(model, [x], 3.0, [0]), comfy.call(patcher, [x], 3.0, [0]))
