"""`hspace ui`: a local web app to find, try, combine and save directions by hand.

One FastAPI app around the framework-free ``Editor`` (``editor.py``), one static page (``static/index.html``: no
asset from the internet). Request bodies are read into the pydantic models of ``requests.py`` (a bad field is HTTP 400
naming the value and what is valid); the guard (``guard.py``) refuses requests that are not from the editor's own
page; the starter set is ``starter.py``'s. Errors are {"error": message}: HTTP 400, refused requests 403, 503 while
the editor starts, 409 for an edit superseded by a newer one of its tab.
"""

import secrets
from pathlib import Path

from ..errors import HspaceError
from ..files import safe_name
from .editor import MAX_UPLOAD_BYTES, Editor, NotReady, Startup
from .guard import LOCAL_NAMES, refusal
from .requests import CardRequest, EditRequest, JacobianRequest, LoadRequest, PromptSliderRequest, SaveRequest

__all__ = ["Editor", "Startup", "create_app"]

STATIC = Path(__file__).parent / "static"


def create_app(editor: "Editor | Startup", host: str = "127.0.0.1", port: int = 7860, token: str | None = None):
    """The FastAPI app of an editor served at ``host``:``port``: the page and its JSON API (errors are
    {"error": message}, HTTP 400; refused requests HTTP 403; while a ``Startup`` builds the editor, HTTP 503 and
    ``/api/info`` says how far it is). ``token`` defaults to a new random one."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    startup = editor if isinstance(editor, Startup) else Startup(editor=editor)
    app = FastAPI(title="hspace editor", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token = token = token or secrets.token_urlsafe(24)
    app.state.startup = startup
    names = {*LOCAL_NAMES, f"[{host}]" if ":" in host else host}
    hosts = {f"{name}:{port}" for name in names}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        problem = refusal(request.method, request.url.path, request.headers, hosts, token)
        if problem is not None:
            return JSONResponse({"error": problem}, status_code=403)
        return await call_next(request)

    @app.exception_handler(HspaceError)
    async def bad_request(_request, error: HspaceError):
        return JSONResponse({"error": str(error)}, status_code=503 if isinstance(error, NotReady) else 400)

    async def body(request: Request, model):
        """The request's JSON body read into its typed request (``requests.py``), or a clear error (HTTP 400)."""
        try:
            data = await request.json()
        except Exception:
            raise HspaceError("the request body must be a JSON object") from None
        return model.read(data)

    @app.get("/")
    def page():
        html = (STATIC / "index.html").read_text().replace("__HSPACE_TOKEN__", token)
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"})

    @app.get("/api/info")
    def info():
        return startup.get().info() if startup.editor is not None else startup.status()

    _editing_routes(app, startup, body)
    _saved_routes(app, startup, body)
    return app


def _editing_routes(app, startup: Startup, body) -> None:
    """The editor's operations: edit, save, Jacobian directions, cards and uploads (each runs off the event loop)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    @app.post("/api/edit")
    async def edit(request: Request):
        data = await body(request, EditRequest)
        result = await run_in_threadpool(startup.get().edit, data)
        return JSONResponse(result, status_code=409 if result.get("superseded") else 200)

    @app.post("/api/save")
    async def save(request: Request):
        data = await body(request, SaveRequest)
        path = startup.get().save(data.name, data.parts)
        asked = safe_name(str(data.name or "").strip(), suffix=".safetensors")
        return {"saved": path.name, "renamed": path.name != asked}

    @app.post("/api/jacobian")
    async def jacobian(request: Request):
        data = await body(request, JacobianRequest)
        editor = startup.get()
        return {"added": await run_in_threadpool(editor.jacobian, data), **editor.info()}

    @app.post("/api/card")
    async def make_card(request: Request):
        data = await body(request, CardRequest)
        editor = startup.get()
        return {"made": await run_in_threadpool(editor.make_card, data), **editor.info()}

    @app.post("/api/prompt-direction")
    async def prompt_slider(request: Request):
        data = await body(request, PromptSliderRequest)
        editor = startup.get()
        return {"added": await run_in_threadpool(editor.prompt_slider, data), **editor.info()}

    @app.post("/api/upload")
    async def upload(request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:  # refused before the body is read
            raise HspaceError(f"the upload has {declared} bytes; valid: at most {MAX_UPLOAD_BYTES} bytes")
        return {"upload": await run_in_threadpool(startup.get().upload, await request.body())}  # Editor.upload checks the bytes


def _saved_routes(app, startup: Startup, body) -> None:
    """The saved combinations: listed, downloaded (only files of ``save_dir`` that the list names), loaded as sliders."""
    from fastapi import Request
    from fastapi.responses import Response

    @app.get("/api/saved")
    def saved():
        return {"saved": startup.get().saved()}

    @app.get("/api/saved/{file}")
    def download(file: str):
        path = startup.get().saved_path(file)
        return Response(path.read_bytes(), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{path.name}"'})

    @app.post("/api/load")
    async def load(request: Request):
        data = await body(request, LoadRequest)
        editor = startup.get()
        return {"added": [editor.load_saved(data.file)], **editor.info()}
