"""Report commands: demo (the main job) and reproduce (the paper's claims measured)."""

from __future__ import annotations

from .common import add_model_args, engine_from, model_of, positive_int


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="measure the paper's claims on the bundled model; a Markdown report with figures")
    add_model_args(p)
    p.add_argument("--quick", action="store_true", help="small counts and 8 steps: minutes instead of half an hour")
    p.add_argument("--claims", nargs="+", default=None, metavar="CLAIM",
                   help="measure only these claims (default: every one): pca_vs_random, table1, fig8, jacobian, swap, asyrp, sequential")
    p.add_argument("--out", default="out/reproduce", help="report folder (an interrupted run resumes from it)")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                   help="measure nothing: print a side-by-side table of these finished reports' verdicts, claim by claim")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: write the report again from --out's cached sections, judged by today's rules (e.g. after an update)")
    p.set_defaults(func=run_reproduce, batch_size=64)

    p = sub.add_parser("blocks", help="which block is h in a diffusion transformer: four of the report's claims measured at every block")
    add_model_args(p)
    p.add_argument("--blocks", nargs="+", default=None, metavar="LOCATION",
                   help="only these h locations (default: every one; `hspace info` lists them: block.N, FLUX's joint.N and single.N)")
    p.add_argument("--quick", action="store_true", help="small counts and 4 steps (the tests' mode)")
    p.add_argument("--any-model", action="store_true",
                   help="measure a model outside the toy-faces domain with the toy-faces classifier (tests the mechanics, not the model)")
    p.add_argument("--out", default="out/blocks", help="study folder (an interrupted study resumes from it)")
    p.set_defaults(func=run_blocks, model="toydit")

    p = sub.add_parser("demo", help="the main job: samples, swaps and edits of the bundled model into a folder")
    p.add_argument("--model", default=None, help="model (default: the bundled model)")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="out/demo", help="output folder")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    from ..demo import run_demo as demo

    for path in demo(args.out, model=model_of(args), steps=args.steps, device=args.device):
        print(path)


def run_reproduce(args) -> None:
    from ..reproduce import compare
    from ..reproduce import run_reproduce as reproduce

    if args.compare:
        print(compare(args.compare), end="")
        return
    print(f"wrote {reproduce(args.out, quick=args.quick, engine=engine_from(args), claims=args.claims, render_only=args.render_only)}")


def run_blocks(args) -> None:
    from ..reproduce.blocks import run_blocks as blocks

    print(f"wrote {blocks(args.out, quick=args.quick, blocks=args.blocks, engine=engine_from(args), any_model=args.any_model)}")
