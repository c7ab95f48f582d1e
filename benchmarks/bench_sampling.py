"""Sampling with h recorded (hspace) vs a plain diffusers DDIMScheduler loop: same model, steps, batch.

Prints the ratio hspace / plain; the target is <= 1.05.
    python benchmarks/bench_sampling.py [--model tiny|celebahq] [--steps 50] [--batch 8]
"""

import torch
from diffusers import DDIMScheduler

from common import alternate, make_engine, parser


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eta", type=float, default=1.0)
    args = p.parse_args()
    engine = make_engine(args.model, args.device)
    seeds = list(range(args.batch))
    config = {k: v for k, v in engine.scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config)
    x_T = engine.sample(seeds, 1, record_h=False).x_T.to(engine.device)

    def plain():
        scheduler.set_timesteps(args.steps)
        generator = torch.Generator().manual_seed(0)
        x = x_T
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = engine.unet(x, t).sample
                x = scheduler.step(eps, t, x, eta=args.eta, generator=generator).prev_sample
        return x.cpu()

    def hspace():
        return engine.sample(seeds, args.steps, args.eta, record_h=True, batch_size=args.batch)

    t = alternate({"plain": plain, "hspace": hspace}, args.repeats, engine.device)
    print(f"model={args.model} device={engine.device} steps={args.steps} batch={args.batch} h={engine.h_shape}")
    print(f"plain diffusers loop : {t['plain']:.3f} s")
    print(f"hspace sample + h    : {t['hspace']:.3f} s")
    print(f"ratio hspace/plain   : {t['hspace'] / t['plain']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
