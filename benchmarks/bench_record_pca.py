"""Directions from my own generations: ``hspace.record`` of N toy-faces generations of a DPM-Solver++ pipeline ->
``pca`` -> ``hspace.steer``, side by side with the same PCA of hspace's own DDIM samples of the same seeds.

For each of the k leading components of either source, the pipeline (DPM-Solver++, 20 steps) draws M held-out
faces steered at -S and +S sigma; the toy-faces classifier reads every attribute. Printed per component: the
attribute it moves most (mean change from -S to +S), that change, the share of binary flips between the two ends,
and the cosine between the two sources' components (the sign of a PC is arbitrary, so |cos|).

    python benchmarks/bench_record_pca.py [--n 16] [--held-out 16] [--k 3] [--scale 3] [--steps 20]
"""

from __future__ import annotations

import argparse

import torch
from common import toyfaces_pipeline


def main() -> int:
    import hspace
    from hspace.directions.pca import pca
    from hspace.toyfaces.classifier import classify
    from hspace.toyfaces.render import ATTRIBUTES, BINARY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    engine, pipe = toyfaces_pipeline("DPMSolverMultistepScheduler")

    def draw(seed: int, batch: int) -> torch.Tensor:
        out = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=args.steps, output_type="np").images
        return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1  # the classifier reads [-1, 1]

    with hspace.record(pipe) as recording:
        draw(0, args.n)
    sources = {"recorded (DPM++)": pca(recording, args.k), "hspace DDIM": pca(engine.sample(range(args.n), 50, 0.0, progress=False), args.k)}
    held = 10_000
    rows = {}
    for label, result in sources.items():
        for j, direction in enumerate(result.directions):
            ends = []
            for sign in (-1, 1):
                with hspace.steer(pipe, direction, sign * args.scale):  # delta_t = sigma_t * component_t: scales in sigma
                    ends.append(classify(draw(held, args.held_out)))
            change = {a: float((ends[1][a] - ends[0][a]).mean()) for a in ATTRIBUTES}
            top = max(change, key=lambda a: abs(change[a]))
            flips = {a: float(((ends[1][a] > 0.5) != (ends[0][a] > 0.5)).float().mean()) for a in BINARY}
            rows[(label, j)] = (top, change[top], max(flips.values()), direction)
    print(f"toy faces: PCA of {args.n} generations, steered at -{args.scale:g}/+{args.scale:g} sigma on {args.held_out} held-out "
          f"faces under DPM-Solver++ ({args.steps} steps)")
    print("| PC | recorded: moves most | change | largest flip share | hspace DDIM: moves most | change | largest flip share | abs cos |")
    print("|---|---|---|---|---|---|---|---|")
    labels = list(sources)
    for j in range(args.k):
        a, b = rows[(labels[0], j)], rows[(labels[1], j)]
        steps = recording.timesteps
        va, vb = a[3].at(steps).delta.flatten(), b[3].at(steps).delta.flatten()
        cos = abs(float(va @ vb / (va.norm() * vb.norm())))
        print(f"| pc{j + 1} | {a[0]} | {a[1]:+.3f} | {a[2]:.2f} | {b[0]} | {b[1]:+.3f} | {b[2]:.2f} | {cos:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
