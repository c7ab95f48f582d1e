"""How the U-Net runs, not what it computes: memory format, compilation and reduced-precision autocast.

``Speed`` is an engine option beside the spec (``Engine.load(model, speed=Speed(...))``, or the
``--channels-last``, ``--compile`` and ``--autocast`` options of the commands). Each option keeps the
process the same up to a stated tolerance (measured by ``benchmarks/bench_peak.py``, held by
``tests/test_speed.py``):

- ``channels_last``: the U-Net's weights and inputs in NHWC memory order (faster convolutions on CPUs and
  tensor cores). Float sums in another order: a sample's x_0 within 1e-4 of the default. Not part of the
  identity of a bank or trajectory.
- ``compile``: ``torch.compile`` of every block of the U-Net except the module that holds h (so the
  interventions on h stay eager Python and nothing recompiles when an edit changes). Within 1e-4 of
  eager. The first batch of each shape pays the compilation (tens of seconds on a CPU); the Jacobian's
  forward-mode products run the same blocks eagerly.
- ``autocast`` ("bfloat16" or "float16"): the U-Net's matmuls and convolutions in that precision, with
  the weights, h as recorded and as the interventions see it, and the step arithmetic in float32 (the
  edited h goes on in the pass's own precision). Not within 1e-4: on the bundled model single pixels of
  x_0 move by up to ~1.4, while the attributes a classifier reads agree (``tests/test_speed.py``). It is
  therefore part of a bank's identity (a bank drawn with it is only extended with it) and opt-in.

- ``offload``: the text encoders and the VAE stay on the CPU and move to the engine's device only while they
  run (encoding a prompt, once per prompt; decoding or encoding images), as diffusers'
  ``enable_model_cpu_offload`` does for a pipeline's components: only the denoiser stays on the GPU. The
  values are the same (the same modules on the same device when they run); the moves cost time.
- ``vae_slicing``: the VAE decodes and encodes one image per call (diffusers' ``enable_vae_slicing``), so its peak
  memory is one image's whatever the batch. Each image is computed as alone: equal to a batched decode up to the
  kernels' batch-shape rounding.
- ``vae_tiling``: the VAE decodes and encodes large images in overlapping tiles (the VAE's own ``enable_tiling``,
  diffusers' tile sizes and blending): memory bounded by a tile for SDXL at 1024 px and beyond. Tiles are blended, so
  an image differs slightly from the untiled decode where tiles overlap (images below the tile size are not tiled).
  Only for a latent model whose VAE supports it.

Nothing is on by default (docs/performance.md): channels_last + compile are within tolerance but gain 9%
at batch 32 on this project's CPU, cost 30-55 s of compilation per batch shape, and would make results
differ in their last bits from every bank drawn before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import HspaceError
from .spec import AUTOCAST_DTYPES


FLAGS = ("channels_last", "compile", "offload", "vae_slicing", "vae_tiling")  # Speed's on/off options


@dataclass(frozen=True)
class Speed:
    """How an engine runs its U-Net (module doc); ``Speed()`` is the plain float32 eager default."""

    channels_last: bool = False
    compile: bool = False
    autocast: str | None = None
    offload: bool = False  # text encoders and the VAE on the CPU between uses (module doc)
    vae_slicing: bool = False  # the VAE one image per call
    vae_tiling: bool = False  # the VAE in overlapping tiles (its enable_tiling)

    def __post_init__(self):
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise HspaceError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise HspaceError(f"unknown autocast dtype {self.autocast!r}; valid: {', '.join(AUTOCAST_DTYPES)} (or None: off)")

    def describe(self) -> str:
        on = [name for name in FLAGS if getattr(self, name)]
        if self.autocast:
            on.append(f"{self.autocast} autocast")
        return ", ".join(on) or "default"

    def prepare(self, unet: nn.Module, h_module: nn.Module, dtype: torch.dtype) -> None:
        """Apply the options to a U-Net (in place); ``h_module`` (the module whose hooks move h) stays eager."""
        if self.autocast is not None and dtype != torch.float32:
            raise HspaceError(f"autocast {self.autocast} needs a float32 model (its weights stay float32); this one is "
                              f"{str(dtype).replace('torch.', '')}: use dtype {self.autocast} instead, or no autocast")
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.compile:
            for block in compiled_blocks(unet, h_module):
                block.compile()

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def context(self, device: torch.device):
        """The autocast region of one U-Net pass (nothing when off)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.autocast))

    def h_function(self, fn: Callable[[torch.Tensor], torch.Tensor] | None):
        """``fn`` as the interventions see it: under autocast h reaches them in float32, and what they return
        goes on in h's own dtype, so that a pass with a hook that changes nothing (recording h) equals a pass
        without one: a replay of an autocast trajectory is exact."""
        if fn is None or self.autocast is None:
            return fn
        return lambda h: fn(h.float()).to(h.dtype)


def compiled_blocks(unet: nn.Module, h_module: nn.Module) -> list[nn.Module]:
    """The U-Net's blocks that ``compile`` compiles: every down and up block, and the children of the
    module holding h (its resnets and attentions), so that the hooks on that module run eagerly."""
    blocks = [*getattr(unet, "down_blocks", ()), *getattr(unet, "up_blocks", ())]
    for child in h_module.children():
        blocks.extend(child if isinstance(child, nn.ModuleList) else [child])
    return blocks


@contextlib.contextmanager
def eager():
    """Run compiled blocks eagerly inside the block (forward-mode AD, the Jacobian's products)."""
    with torch.compiler.set_stance("force_eager"):
        yield


CPU_BATCH_CAP = 64  # on a CPU, batches past 32-64 gain nothing (benchmarks/bench_peak.py --batches)
BATCH_CAP = 1024


def activation_bytes(model, batch: int = 1) -> int:
    """Bytes of every module output in one U-Net pass of ``batch`` samples: an upper bound of what a pass
    without gradients holds at once (it frees each activation once used)."""
    total = 0

    def count(_module, _args, output):
        nonlocal total
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if torch.is_tensor(out):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(count) for m in model.unet.modules() if m is not model.unet]
    try:
        with eager():  # hooks inside compiled blocks would not run
            model.output(torch.zeros(batch, *model.sample_shape), 500)
    finally:
        for handle in handles:
            handle.remove()
    return total


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def auto_batch_size(model, fraction: float = 0.5) -> int:
    """The batch size whose U-Net pass fits in ``fraction`` of the free memory of the model's device
    (``--batch-size auto``): per-sample memory from ``activation_bytes``, guided passes counted twice;
    at most 64 on a CPU, where larger batches are no faster."""
    if not 0 < fraction <= 1:
        raise HspaceError(f"fraction must be in (0, 1], got {fraction!r}")
    per_sample = max(1, activation_bytes(model, 1)) * (2 if getattr(model, "guided", False) else 1)
    cap = BATCH_CAP if model.device.type == "cuda" else CPU_BATCH_CAP
    return int(max(1, min(cap, fraction * free_memory(model.device) // per_sample)))
