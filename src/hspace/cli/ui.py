"""`hspace ui`: the browser editor (``hspace.ui``), served on this machine."""

from __future__ import annotations

import sys

from ..errors import HspaceError
from .common import add_model_args, card_scoring, engine_from, engine_of_spec, nonnegative_int, parse_eta, positive_int


def port_number(text: str) -> int:
    import argparse

    value = nonnegative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port; valid: 0 (a free one) to 65535")
    return value

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    p = sub.add_parser("ui", help="the interactive editor in the browser: sliders per direction, windows, save, Jacobian on demand")
    add_model_args(p)
    p.add_argument("--steps", type=positive_int, default=25, help="generative steps of the samples edited (default 25; a bank: its own)")
    p.add_argument("--eta", default="1.0", help="eta of the samples (default 1; a bank: its own)")
    p.add_argument("--bank", default=None, help="a bank: its engine, steps and samples (pick them by index)")
    p.add_argument("--directions", nargs="+", default=None, help="direction files or folders (default: PCs and, for toyfaces, "
                   "classifier-annotated supervised directions of a small bank drawn on start)")
    p.add_argument("--save-dir", default="out/ui/saved", help="the only folder the page can write to (saved combinations)")
    p.add_argument("--workdir", default="out/ui", help="where the starter bank is kept between starts")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="the port (0: a free one, printed)")
    p.add_argument("--eager-preview", action="store_true", help="do not compile the previews' denoiser (by default it is compiled in "
                   "the background at start, ~30%% faster per pass on a CPU; the bundled kind of model only)")
    p.add_argument("--allow-remote", action="store_true", help="needed to listen on another address than this machine's")
    p.add_argument("--scorer", default="domain", help="what the card button scores with: domain (the model's classifier; default), a "
                   "domain name, or clip:DIR (a local CLIP model, with --attributes; text-to-image models)")
    p.add_argument("--attributes", nargs="+", default=None, metavar="NAME='WITH|WITHOUT'",
                   help="with a CLIP scorer: the attributes as prompt pairs, e.g. smile='a smiling face|a face'")
    p.set_defaults(func=run_ui, outputs={"save_dir": "dir", "workdir": "dir"})


def build_editor(args, startup):
    """The editor of the command's arguments, built in ``startup``'s thread while the page is served: the model is
    loaded (importing diffusers alone takes seconds) and, on a first start, the starter set drawn."""
    from ..bank import Bank
    from ..directions.direction import load_directions
    from ..ui.editor import Editor
    from ..ui.starter import starter_directions

    startup.report("loading the model")
    if args.bank:
        bank = Bank.open(args.bank)
        engine = engine_of_spec(bank.spec, args, "the bank")
        steps, eta = bank.num_steps, bank.eta
    else:
        bank, engine, steps = None, engine_from(args), args.steps
        eta = parse_eta(args.eta)
    if not isinstance(eta, float):
        eta = float(eta[0]) if len(set(map(float, eta))) == 1 else None
        if eta is None:
            raise HspaceError("the editor draws samples with one eta for all steps; give one number")
    if args.directions:
        directions = load_directions(args.directions)
    else:
        startup.report("drawing the starter set")
        directions = starter_directions(engine, args.workdir, steps, eta, callback=startup.step_callback("drawing the starter set"))
    scorer, domain = card_scoring(args, engine.name)
    return Editor(engine, directions, args.save_dir, steps, eta, bank, compile_preview=not args.eager_preview, scorer=scorer,
                  scorer_domain=domain)


def run_ui(args) -> None:
    try:
        import uvicorn

        from ..ui.server import Startup, create_app
    except ImportError:
        raise HspaceError("the editor needs its extra: pip install 'hspace[ui]' torch==2.13.0") from None
    if args.host not in LOCAL_HOSTS and not args.allow_remote:
        raise HspaceError(f"--host {args.host} would serve the editor to other machines; add --allow-remote if you mean it")
    if args.host not in LOCAL_HOSTS:
        print(f"warning: listening on {args.host}: anyone who can reach this port can use the editor and write to {args.save_dir}", file=sys.stderr)
    args.port = _bindable(args.host, args.port)  # before any work: a taken port is a message, 0 a free port (printed)
    startup = Startup(lambda startup: build_editor(args, startup))
    server = uvicorn.Server(uvicorn.Config(create_app(startup, args.host, args.port), host=args.host, port=args.port, log_level="warning"))
    startup.start(on_error=lambda: setattr(server, "should_exit", True))
    print(f"hspace editor: http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/  "
          f"(saves go to {args.save_dir}; Ctrl-C stops; the page shows the editor's start)", flush=True)
    server.run()
    if startup.error is not None:  # the model or the directions were refused: the server stopped, the command fails
        raise HspaceError(f"the editor could not start: {startup.error}")


def _bindable(host: str, port: int) -> int:
    """``port`` if this server can listen there (0: a free one, chosen now so that the URL printed is the one
    served); a taken or forbidden port is an error that says so."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise HspaceError(f"cannot listen on {host}:{port} ({e.strerror}): another server may have it; choose another --port, "
                              "or --port 0 for a free one") from None
        return s.getsockname()[1]
