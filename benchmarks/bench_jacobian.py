"""One Jacobian iteration (paper Alg. 1: J V by a JVP, then J^T U by a VJP, k vectors in one batch):
differentiating the decoder half only (unet_split) vs differentiating the whole U-Net with h hooked.

Prints, per iteration, the decoder-only and the full-U-Net products of ``JacobianProducts`` in both
batching modes, and the naive full-U-Net iteration (torch.func.jvp, then torch.func.vjp running the
U-Net forward again at h repeated k times); then the ratios full / decoder-only (higher: the split
helps more) and naive / the library's default (decoder, vmap).
``--flops`` counts floating-point operations on the meta device instead of timing: nothing is
computed, so it is cheap even for the 256 px model.
    python benchmarks/bench_jacobian.py [--model tiny|celebahq] [--k 8] [--flops]
"""

import torch

from hspace.directions.jacobian import JacobianProducts
from hspace.hooks import h_hook
from hspace.unet_split import decode, encode, forward_mode
from common import alternate, celebahq_unet, make_engine, parser


def iterations(unet, location: str, x: torch.Tensor, t: int, k: int, generator: torch.Generator) -> dict:
    """name -> a function running one iteration (J V, then J^T U) on k fixed vectors."""
    cache = encode(unet, x, t, location)
    h = cache.h[0]
    V = torch.randn(k, *h.shape, generator=generator).to(h.device)
    timestep = torch.tensor(t, device=h.device)

    def decoder(hh):
        return decode(unet, hh, cache)

    def full(delta):  # the whole U-Net at x_t with h + delta: differentiating it without the split
        with h_hook(unet, location, lambda hh: hh + delta):
            return unet(x.repeat(delta.shape[0], 1, 1, 1), timestep).sample

    zero = torch.zeros_like(h)
    fns = {}
    for batching in ("repeat", "vmap"):
        for name, fn, point in (("decoder", decoder, h), ("full", full, zero)):
            products = JacobianProducts(fn, point, batching)
            fns[f"{name} {batching}"] = lambda p=products: p.vjp(p.jvp(V))

    def naive():
        zeros = zero.expand(k, *zero.shape).contiguous()
        _, U = torch.func.jvp(full, (zeros,), (V,))
        _, vjp = torch.func.vjp(full, zeros)
        return vjp(U)

    fns["naive full"] = naive
    return fns


def count_flops(fns: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, fn in fns.items():
        fn()  # builds the cached graph (once per run in the library) outside the count
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    return flops


def main():
    p = parser(__doc__)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--timestep", type=int, default=500)
    p.add_argument("--flops", action="store_true", help="count FLOPs on the meta device instead of timing")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.flops:
        from diffusers import UNet2DModel

        from hspace.loading import tiny_unet_config

        with torch.device("meta"):
            unet = celebahq_unet() if args.model == "celebahq" else UNet2DModel(**tiny_unet_config())
        unet = unet.eval().requires_grad_(False)
        size = unet.config.sample_size
        x, location, device = torch.randn(1, 3, size, size, device="meta"), "mid.out", "meta"
    else:
        engine = make_engine(args.model, args.device)
        unet, location, device = engine.unet, engine.h_location, engine.device
        x = torch.randn(1, *engine.sample_shape, generator=gen).to(device, engine.dtype)

    with forward_mode(unet):
        fns = iterations(unet, location, x, args.timestep, args.k, gen)
        cost = count_flops(fns) if args.flops else alternate(fns, args.repeats, device)

    unit = "TFLOP" if args.flops else "s"
    scale = 1e12 if args.flops else 1.0
    print(f"model={args.model} device={device} h at {location} k={args.k} timestep={args.timestep}")
    for name, c in cost.items():
        print(f"  {name:12s}: {c / scale:.4g} {unit} per iteration")
    for batching in ("repeat", "vmap"):
        print(f"ratio full/decoder-only ({batching}): {cost[f'full {batching}'] / cost[f'decoder {batching}']:.2f}x")
    print(f"ratio naive full/library default (decoder vmap): {cost['naive full'] / cost['decoder vmap']:.2f}x")


if __name__ == "__main__":
    main()
