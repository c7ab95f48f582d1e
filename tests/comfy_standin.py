"""A small stand-in for the parts of ComfyUI the hspace nodes meet, written from ComfyUI's calling convention (no
ComfyUI code): a ModelPatcher (clone deep-copies model_options; patches and replace patches kept there), a discrete
model sampling (log-sigma nearest timestep, percent_to_sigma), a flow one (FLUX: the timestep is sigma), a U-Net
whose forward runs diffusers' blocks and calls the output-block and input-after-skip patches where ComfyUI's
``UNetModel`` does, a FLUX-like token model with double and single blocks behind ``patches_replace["dit"]``, and a
cfg call that batches guidance chunks in any order with ``cond_or_uncond`` and ``sigmas`` in transformer_options."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def get_model_object(self, name):
        return getattr(self.model, name)

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_output_block_patch(self, patch):
        self.set_model_patch(patch, "output_block_patch")

    def set_model_input_block_patch_after_skip(self, patch):
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_patch_replace(self, patch, name, block_name, number):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
        to["patches_replace"].setdefault(name, {})[(block_name, number)] = patch
        self.model_options["transformer_options"] = to


class DiscreteSampling(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("log_sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().float())

    def timestep(self, sigma):
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.log_sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


class FlowSampling(nn.Module):
    def timestep(self, sigma):
        return sigma

    def percent_to_sigma(self, percent):
        return 1.0 - percent if 0 < percent < 1 else (1.0 if percent <= 0 else 0.0)


class UNetModel(nn.Module):
    """diffusers' UNet2DModel blocks in ComfyUI's order of patches: input blocks, middle, output blocks."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.input_blocks = unet.down_blocks

    def forward(self, x, timesteps, transformer_options):
        u = self.unet
        patches = transformer_options.get("patches", {})
        emb = u.time_embedding(u.time_proj(timesteps).to(x.dtype))
        h, skips = u.conv_in(x), []
        skips.append(h)
        for i, block in enumerate(u.down_blocks):
            transformer_options["block"] = ("input", i)
            h, res = block(hidden_states=h, temb=emb)
            skips += list(res)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        h = u.mid_block(h, emb)
        for i, block in enumerate(u.up_blocks):
            transformer_options["block"] = ("output", i)
            hsp = None
            for p in patches.get("output_block_patch", []):
                h, hsp = p(h, hsp, transformer_options)
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            h = block(h, res, emb)
        return u.conv_out(u.conv_act(u.conv_norm_out(h)))


class Block(nn.Module):
    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.img, self.txt = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, img, txt=None):
        return (img + torch.tanh(self.img(img)), None if txt is None else txt + torch.tanh(self.txt(txt)))


class Flux(nn.Module):
    """Token blocks behind ComfyUI's FLUX replace patches: double blocks on (img, txt), single blocks on cat(txt, img)."""

    def __init__(self, width: int = 8, double: int = 2, single: int = 2):
        super().__init__()
        self.double_blocks = nn.ModuleList(Block(width, i) for i in range(double))
        self.single_blocks = nn.ModuleList(Block(width, 10 + i) for i in range(single))

    def forward(self, img, txt, transformer_options):
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in replace:
                wrap = lambda args, block=block: dict(zip(("img", "txt"), block(args["img"], args["txt"])))  # noqa: E731
                out = replace[("double_block", i)]({"img": img, "txt": txt, "transformer_options": transformer_options}, {"original_block": wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt)
        img = torch.cat([txt, img], 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                wrap = lambda args, block=block: {"img": block(args["img"])[0]}  # noqa: E731
                img = replace[("single_block", i)]({"img": img, "transformer_options": transformer_options}, {"original_block": wrap})["img"]
            else:
                img = block(img)[0]
        return img[:, txt.shape[1]:]


class Model(nn.Module):
    def __init__(self, diffusion_model, model_sampling):
        super().__init__()
        self.diffusion_model, self.model_sampling = diffusion_model, model_sampling


def call(patcher: ModelPatcher, inputs: list[torch.Tensor], sigma: float, cond_or_uncond: list[int], **extra):
    """One guided model call as ComfyUI's calc_cond_batch makes it: the chunks concatenated in ``cond_or_uncond``
    order, the sigmas and chunk list in a fresh copy of transformer_options."""
    options = dict(patcher.model_options["transformer_options"])
    batch = torch.cat(inputs)
    sigmas = torch.full((len(batch),), float(sigma))
    options.update({"cond_or_uncond": list(cond_or_uncond), "sigmas": sigmas})
    model = patcher.model
    t = model.model_sampling.timestep(sigmas)
    if isinstance(model.diffusion_model, UNetModel):
        return model.diffusion_model(batch, t, options)
    return model.diffusion_model(batch, torch.cat(extra["txt"]), options)
