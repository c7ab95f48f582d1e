"""The hspace nodes in the real ComfyUI: skipped unless ``HSPACE_COMFYUI`` names a ComfyUI checkout (ComfyUI is not on
PyPI; its requirements torchsde, einops, av, aiohttp, alembic, SQLAlchemy, psutil, pyyaml, scipy installed beside
hspace; torchvision, which has no wheel for torch 2.13 here, is replaced by a one-file stand-in for its imports).

On a tiny random SD1.5-shaped U-Net built with ComfyUI's own model classes, through ``comfy.sample.sample``:
- the node's edit equals a forward hook on the same module (the middle block's last ResBlock, with the t ComfyUI
  passes the model) within 1e-6 under euler/normal, dpmpp_2m/karras and heun; the input MODEL is unchanged;
- the same weights in diffusers (converted by ComfyUI's own key map, ``comfy.utils.unet_to_diffusers``) give the same h
  at ``mid.out`` within 1e-5, so a direction found with hspace applies in ComfyUI.

    HSPACE_COMFYUI=/path/to/ComfyUI .venv/bin/python -m pytest tests/test_comfyui_contract.py
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.environ.get("HSPACE_COMFYUI")
pytestmark = pytest.mark.skipif(not ROOT, reason="set HSPACE_COMFYUI to a ComfyUI checkout to run the contract with the real ComfyUI")

UNET = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
        "transformer_depth_middle": 1, "context_dim": 32, "num_head_channels": 8, "use_spatial_transformer": True,
        "use_linear_in_transformer": False, "legacy": False, "adm_in_channels": None}
STEPS = 4


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from diffusers import UNet2DConditionModel  # noqa: F401  (imported before the stand-in: diffusers probes torchvision)

    stub = tmp_path_factory.mktemp("torchvision-stand-in")
    (stub / "torchvision" / "transforms").mkdir(parents=True)
    (stub / "torchvision" / "__init__.py").write_text("from . import transforms  # noqa: F401\n")
    (stub / "torchvision" / "transforms" / "__init__.py").write_text('"""Only imported by ComfyUI\'s model list, never called."""\n')
    sys.path[:0] = [ROOT, str(stub)]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads it
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    import comfy.utils

    return comfy


def _tiny(comfy, family, config: dict, seed: int):
    """A ModelPatcher of ComfyUI's ``supported_models.<family>`` built from ``config`` with seeded random weights."""
    model_config = getattr(comfy.supported_models, family)(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # ComfyUI's layers skip initialisation: random weights, seeded
        p.data = torch.randn(p.shape, generator=generator) * 0.05
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def sd15(comfy):
    return _tiny(comfy, "SD15", UNET, 0)


def _sample(comfy, patcher, sampler, scheduler):
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(1, 8, 32, generator=generator)
    noise = torch.randn(1, 4, 16, 16, generator=generator)
    return comfy.sample.sample(patcher, noise, STEPS, 3.0, sampler, scheduler, [[context, {}]], [[torch.zeros(1, 8, 32), {}]],
                               torch.zeros(1, 4, 16, 16), seed=0, disable_pbar=True)


def _direction():
    from hspace.directions.direction import Direction
    from hspace.spec import Spec

    delta = torch.randn(5, 64, 8, 8, generator=torch.Generator().manual_seed(2)) * 2
    return Direction(delta, meta={"name": "d"}, spec=Spec("tiny-comfy", h_location="mid.out"), timesteps=torch.linspace(999, 0, 5).round())


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras"), ("heun", "normal")])
def test_the_node_edit_equals_a_forward_hook_on_the_same_module(comfy, sd15, sampler, scheduler):
    from hspace.comfyui import apply_direction

    d = _direction()
    plain = _sample(comfy, sd15, sampler, scheduler)
    options_before = repr(sd15.model_options)
    patched = apply_direction(sd15, [d], [1.5], units="raw")
    edited = _sample(comfy, patched, sampler, scheduler)
    assert repr(sd15.model_options) == options_before and torch.equal(_sample(comfy, sd15, sampler, scheduler), plain)
    unet, seen = sd15.model.diffusion_model, []
    handles = [unet.register_forward_pre_hook(lambda _m, args: seen.append(args[1])),
               unet.middle_block[-1].register_forward_hook(
                   lambda _m, _a, out: out + 1.5 * d.at(seen[-1].double().reshape(-1)[:1]).delta[0].to(out.dtype))]
    try:
        expected = _sample(comfy, sd15, sampler, scheduler)
    finally:
        for h in handles:
            h.remove()
    print(f"{sampler}/{scheduler}: |node - hook| = {float((edited - expected).abs().max()):.2e}, edit moved "
          f"{float((edited - plain).abs().max()):.3f}")
    assert float((edited - expected).abs().max()) < 1e-6 and float((edited - plain).abs().max()) > 1e-3


def test_the_same_weights_in_diffusers_give_the_same_h_at_mid_out(comfy, sd15):
    from diffusers import UNet2DConditionModel

    from hspace.models import hook_points

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    ldm = sd15.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(dict(UNET))  # diffusers key -> ComfyUI (LDM) key
    converted = {k: ldm[v] for k, v in mapping.items() if v in ldm}
    missing, unexpected = unet.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    generator = torch.Generator().manual_seed(3)
    x, context, t = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 8, 32, generator=generator), torch.tensor([700.0, 700.0])
    ours = []
    handle = hook_points(unet)["mid.out"].attach(unet, lambda h: ours.append(h) or h)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=context)
    handle.remove()
    theirs = []
    options = {"patches": {"output_block_patch": [lambda h, hsp, o: (theirs.append(h) if o["block"] == ("output", 0) else None) or (h, hsp)]}}
    with torch.no_grad():
        sd15.model.diffusion_model(x, t, context=context, transformer_options=options)
    print(f"mid.out: |diffusers h - ComfyUI h| = {float((ours[0] - theirs[0]).abs().max()):.2e}")
    assert float((ours[0] - theirs[0]).abs().max()) < 1e-5


FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 32,
        "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": True}


@pytest.fixture(scope="module")
def flux(comfy):
    return _tiny(comfy, "Flux", FLUX, 4)


@pytest.mark.parametrize("location", ["joint.0", "single.1"])
def test_the_flux_node_edit_equals_a_forward_hook_on_the_same_block(comfy, flux, location):
    """FLUX (flow matching: ComfyUI's timestep is sigma, hspace's 1000 sigma) at a double block's image tokens and at
    the image tokens of a single block's [text; image] sequence, under euler/simple."""
    from hspace.comfyui import apply_direction
    from hspace.directions.direction import Direction
    from hspace.spec import Spec

    generator = torch.Generator().manual_seed(5)
    context, pooled = torch.randn(1, 6, 32, generator=generator), torch.randn(1, 32, generator=generator)
    noise = torch.randn(1, 16, 16, 16, generator=generator)
    d = Direction(torch.randn(4, 32, 8, 8, generator=generator), meta={"name": "f"}, spec=Spec("tiny-flux", h_location=location),
                  timesteps=torch.linspace(1000, 0, 4))

    def sample(patcher):
        cond = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
        return comfy.sample.sample(patcher, noise, STEPS, 1.0, "euler", "simple", cond, cond, torch.zeros(1, 16, 16, 16), seed=0,
                                   disable_pbar=True)

    plain = sample(flux)
    edited = sample(apply_direction(flux, [d], [2.0], units="raw"))
    dit, seen = flux.model.diffusion_model, []
    kind, index = location.split(".")
    block = (dit.double_blocks if kind == "joint" else dit.single_blocks)[int(index)]

    def add(_m, _a, out):
        tokens = 2.0 * d.at(seen[-1].double().reshape(-1)[:1] * 1000).delta[0].reshape(32, -1).T
        if kind == "joint":  # (img, txt)
            return (out[0] + tokens, out[1])
        return torch.cat([out[:, :6], out[:, 6:6 + 64] + tokens, out[:, 6 + 64:]], 1)  # [text; image]

    handles = [dit.register_forward_pre_hook(lambda _m, args: seen.append(args[1])), block.register_forward_hook(add)]
    try:
        expected = sample(flux)
    finally:
        for h in handles:
            h.remove()
    print(f"flux {location}: |node - hook| = {float((edited - expected).abs().max()):.2e}, edit moved {float((edited - plain).abs().max()):.3f}")
    assert float((edited - expected).abs().max()) < 1e-6 and float((edited - plain).abs().max()) > 1e-3
    assert "patches_replace" not in flux.model_options["transformer_options"]


def test_the_example_workflows_validate_in_comfyui(comfy, tmp_path):
    """integrations/comfyui/workflows/*.json pass ComfyUI's own ``execution.validate_prompt`` with the pack loaded as a
    custom node (the model files they name exist as empty placeholders: validation checks names, not weights)."""
    import asyncio
    import json
    from pathlib import Path

    import folder_paths

    import execution
    import nodes

    pack = Path(__file__).resolve().parents[1] / "integrations" / "comfyui"
    for extra in ("nodes_flux.py", "nodes_sd3.py"):  # FluxGuidance, EmptySD3LatentImage: ComfyUI's built-in extra nodes
        asyncio.run(nodes.load_custom_node(os.path.join(ROOT, "comfy_extras", extra), module_parent="comfy_extras"))
    asyncio.run(nodes.load_custom_node(str(pack)))
    assert "HspaceApplyDirection" in nodes.NODE_CLASS_MAPPINGS
    for folder, files in {"checkpoints": ["v1-5-pruned-emaonly.safetensors"], "diffusion_models": ["flux1-dev.safetensors"],
                          "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"], "vae": ["ae.safetensors"],
                          "hspace": ["smile.safetensors", "flux/smile.safetensors"]}.items():
        for name in files:
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / name).write_bytes(b"")
        folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
    folder_paths.filename_list_cache.clear()
    for workflow in sorted((pack / "workflows").glob("*.json")):
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", json.loads(workflow.read_text()), None))
        print(f"{workflow.name}: valid {valid}, outputs {outputs}")
        assert valid, (workflow.name, error, node_errors)
