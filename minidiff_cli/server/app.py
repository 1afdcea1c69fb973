"""The FastAPI app: routes, one-line error answers, and the middleware around them.

``create_app(settings)`` builds everything from the command's settings; nothing here reads the
environment or the command line. Middleware, outermost first: the body limit (413 before a byte
too many is read), CORS (only with ``--cors``), auth (only with ``--token`` or ``--api-auth``).
Every error is JSON ``{"error": kind, "detail": one line}``: 422 for a bad value, 401, 413, 503
(with Retry-After) for a full queue, 500 (its traceback on the server's stderr only).
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from minidiff_cli.errors import MinidiffError, first_line
from minidiff_cli.inference.infotext import printable
from minidiff_cli.server import a1111, openai, render
from minidiff_cli.server.auth import Auth
from minidiff_cli.server.catalogue import Catalogue, Entry
from minidiff_cli.server.drawing import draw
from minidiff_cli.server.jobs import Board, Busy, Job
from minidiff_cli.server.limits import MAX_BODY_BYTES, BodyLimit
from minidiff_cli.server.pictures import open_picture, png_texts

PAGE_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
RETRY_AFTER_S = 5
DISCONNECT_POLL_S = 0.5


@dataclass
class Settings:
    model: Entry
    catalogue: Catalogue
    device: str = "auto"
    dtype: str = "auto"
    token: str | None = None
    api_auth: str | None = None
    cors: list[str] = field(default_factory=list)
    save_dir: Path | None = None
    queue: int = 8


class State:
    """The current model (what a request without override_settings runs on) and the workers."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.current = settings.model
        self.board = Board(self._load, settings.queue)

    def _load(self, entry: Entry):
        from minidiff_cli.inference.pipeline import Pipeline

        return Pipeline.load(str(entry.path), device=self.settings.device, dtype=self.settings.dtype)

    def preload(self, entry: Entry):
        """Load ``entry`` in its worker (a job of its own); returns the Future of that load."""
        return self.board.submit(entry, Job(lambda pipe, job: pipe, label="load")).future


def create_app(settings: Settings) -> FastAPI:
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(state.board.shutdown)  # running jobs stop at their next step

    # No /docs: its page loads scripts from a CDN; /openapi.json describes the API.
    app = FastAPI(title="minidiff", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.minidiff = state
    _errors(app)
    _page(app)
    _a1111(app, state)
    _openai(app, state)
    app.add_middleware(Auth, token=settings.token, basic=settings.api_auth)
    if settings.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    return app


# -- errors ------------------------------------------------------------------------------------------
def error(status: int, kind: str, detail: str, headers: dict | None = None) -> JSONResponse:
    line = printable(" ".join(str(detail).split()))[:500] or "unknown error"
    return JSONResponse({"error": kind, "detail": line}, status_code=status, headers=headers)


def validation_line(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return error(422, "ValidationError", validation_line(exc))

    @app.exception_handler(MinidiffError)
    async def refused(request, exc):
        return error(422, type(exc).__name__, first_line(exc, 500, type(exc).__name__))

    @app.exception_handler(Busy)
    async def busy(request, exc):
        return error(503, "Busy", f"{exc}; try again shortly", {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(HTTPException)
    async def http(request, exc):
        return error(exc.status_code, "HTTPError", str(exc.detail), getattr(exc, "headers", None))


async def run_job(request: Request, state: State, plan, label: str):
    """Queue ``plan`` on its model's worker and wait for it, dropping it if the client leaves."""
    job = Job(lambda pipe, job: draw(pipe, plan, job), label=label)
    state.board.submit(plan.model, job)  # Busy: 503 at once
    job.future.add_done_callback(lambda f: f.exception())  # read, so an orphaned failure logs nothing
    waiting = asyncio.wrap_future(job.future)
    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even if nobody waits any more
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await request.is_disconnected():
            job.cancelled.set()  # skipped if queued, stopped at its next step if running
            raise HTTPException(499, "the client closed the connection")
    try:
        return waiting.result()
    except (MinidiffError, Busy, HTTPException):
        raise
    except Exception as exc:  # minidiff's or a plugin's bug: the client gets one line, the log the traceback
        traceback.print_exception(exc, file=sys.stderr)
        raise HTTPException(500, f"the job failed: {type(exc).__name__}: {first_line(exc, 300)}") from None


async def drawn_images(request: Request, state: State, plan, label: str):
    drawn = await run_job(request, state, plan, label)
    images = await run_in_threadpool(render.encode, drawn, plan.width, plan.height, state.settings.save_dir)
    return drawn, images


# -- the page ----------------------------------------------------------------------------------------
def _page_text(name: str) -> str:
    return (resources.files("minidiff_cli.server") / "page" / name).read_text(encoding="utf-8")


def _page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index():
        return HTMLResponse(_page_text("index.html"))

    @app.get("/page/{name}", include_in_schema=False)
    def page_file(name: str):
        if name not in PAGE_FILES:  # a fixed list: no client value names a file
            raise HTTPException(404, "no such page file")
        return Response(_page_text(name), media_type=PAGE_FILES[name])


# -- AUTOMATIC1111 -----------------------------------------------------------------------------------
def _a1111(app: FastAPI, state: State) -> None:
    api = "/sdapi/v1"
    catalogue = state.settings.catalogue

    @app.post(f"{api}/txt2img")
    async def txt2img(req: a1111.Txt2Img, request: Request):
        plan = a1111.to_plan(req, a1111.model_of(req, catalogue, state.current))
        drawn, images = await drawn_images(request, state, plan, "txt2img")
        return a1111.answer(req, plan, drawn, images, render.infotexts(drawn))

    @app.post(f"{api}/img2img")
    async def img2img(req: a1111.Img2Img, request: Request):
        model = a1111.model_of(req, catalogue, state.current)
        plan = await run_in_threadpool(a1111.to_plan, req, model, open_picture)  # decoding is CPU work
        drawn, images = await drawn_images(request, state, plan, "img2img")
        return a1111.answer(req, plan, drawn, images, render.infotexts(drawn))

    @app.get(f"{api}/samplers")
    def samplers():
        return a1111.samplers()

    @app.get(f"{api}/schedulers")
    def schedulers():
        return a1111.schedulers()

    @app.get(f"{api}/sd-models")
    def sd_models():
        return [entry.a1111() for entry in catalogue.entries()]

    @app.post(f"{api}/refresh-checkpoints")
    def refresh():
        return None  # the list is read afresh on every look-up

    @app.get(f"{api}/options")
    def get_options():
        return a1111.options(state.current)

    @app.post(f"{api}/options")
    async def set_options(req: a1111.Options):
        if req.sd_model_checkpoint:
            entry = catalogue.find(req.sd_model_checkpoint)
            await asyncio.wrap_future(state.preload(entry))  # as AUTOMATIC1111: answers once loaded
            state.current = entry
        return None

    @app.get(f"{api}/cmd-flags")
    def cmd_flags():
        return {"api": True, "nowebui": False, "api_auth": bool(state.settings.api_auth)}

    @app.get(f"{api}/progress")
    def progress():
        return a1111.progress(state.board, render.preview_b64)

    @app.post(f"{api}/interrupt")
    def interrupt():
        state.board.interrupt()
        return None

    @app.post(f"{api}/skip")
    def skip():
        state.board.interrupt()  # minidiff draws a request's pictures together: skipping one stops the job
        return None

    @app.post(f"{api}/png-info")
    def png_info(req: a1111.PngInfo):
        return a1111.png_info(png_texts(req.image))

    @app.get(f"{api}/scripts")
    def scripts():
        return a1111.scripts()

    for kind in a1111.EMPTY_LISTS:
        app.add_api_route(f"{api}/{kind}", _empty_list(kind), methods=["GET"])


def _empty_list(kind: str):
    def route():  # no parameters: nothing a client sends changes the answer
        return a1111.empty(kind)
    return route


# -- OpenAI ------------------------------------------------------------------------------------------
def _openai(app: FastAPI, state: State) -> None:
    catalogue = state.settings.catalogue

    @app.post("/v1/images/generations")
    async def generations(req: openai.Generations, request: Request):
        model = catalogue.find(req.model) if req.model else state.current
        plan = openai.to_plan(req, model)
        _, images = await drawn_images(request, state, plan, "txt2img")
        return openai.answer(images, plan)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": e.name, "object": "model", "owned_by": e.where}
                                           for e in catalogue.entries()]}
