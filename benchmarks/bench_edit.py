"""Edits at 8 scales in one batched replay vs 8 single replays of the same sample.

Prints the ratio single / batched (higher: batching helps more).
    python benchmarks/bench_edit.py [--model tiny|celebahq] [--steps 50]
"""

import torch

from hspace import Direction
from common import alternate, make_engine, parser


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scales", type=int, default=8)
    args = p.parse_args()
    engine = make_engine(args.model, args.device)
    trajectory = engine.sample([0], args.steps, 1.0)
    direction = Direction(torch.randn(args.steps, *engine.h_shape), meta={"name": "random"})
    scales = [float(s) for s in torch.linspace(-2, 2, args.scales)]

    def batched():
        return engine.edit(trajectory, direction, scales, batch_size=len(scales)).images

    def single():
        return [engine.replay(trajectory, direction, scale=s).x0 for s in scales]

    t = alternate({"batched": batched, "single": single}, args.repeats, engine.device)
    print(f"model={args.model} device={engine.device} steps={args.steps} scales={len(scales)}")
    print(f"{len(scales)} single replays : {t['single']:.3f} s")
    print(f"one batched edit  : {t['batched']:.3f} s")
    print(f"ratio single/batched: {t['single'] / t['batched']:.2f}x")


if __name__ == "__main__":
    main()
