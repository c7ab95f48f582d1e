"""A text slider steered into diffusers' own StableDiffusionPipeline with DPM-Solver++ (docs/steer.md): the bundled
toysd, a prompt-pair direction for each binary attribute found by hspace's DDIM loop, then ``hspace.steer`` at several
scales inside the pipeline's call under a prompt that does not name the attribute, on held-out seeds. Printed per
attribute and scale: the share of faces with the attribute (the toy-faces classifier), and the share of the other
binary attributes changed from scale 0.

    python benchmarks/toysd_steer.py [--n 32] [--steps 20] [--scales 0 1 2] [--prompt "a face, black hair"]
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    import hspace
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from hspace.directions.prompts import prompt_direction
    from hspace.loading import TOYSD_FOLDER
    from hspace.toyfaces.captions import caption
    from hspace.toyfaces.classifier import classify
    from hspace.toyfaces.render import BINARY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--prompt", default="a face, black hair")
    args = parser.parse_args()
    engine = hspace.Engine.load("toysd", guidance=5.0)
    pipe = StableDiffusionPipeline.from_pretrained(str(TOYSD_FOLDER), torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def draw() -> dict:
        generators = [torch.Generator().manual_seed(10_000 + i) for i in range(args.n)]
        images = pipe([args.prompt] * args.n, num_inference_steps=args.steps, guidance_scale=5.0, generator=generators, output_type="pt").images
        return {k: v > 0.5 for k, v in classify(images * 2 - 1).items() if k in BINARY}

    print(f"toysd, DPM-Solver++ {args.steps} steps, guidance 5, prompt {args.prompt!r}, {args.n} held-out seeds")
    print("| attribute | " + " | ".join(f"scale {s:g}: with it / others changed" for s in args.scales) + " |")
    print("|---|" + "---|" * len(args.scales))
    for attribute in ("smile", "glasses", "hat", "eyes_open"):
        slider = prompt_direction(engine, [(caption({attribute: True}), caption({attribute: False}))], 32, 25, 0.0, progress=False)
        cells, base = [], None
        for scale in args.scales:
            with hspace.steer(pipe, slider, scale):
                labels = draw()
            base = base or labels
            others = [b for b in BINARY if b != attribute]
            changed = float(torch.stack([(labels[b] != base[b]).float() for b in others]).mean())
            cells.append(f"{100 * float(labels[attribute].float().mean()):.0f}% / {100 * changed:.0f}%")
        print(f"| {attribute} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
