"""``minidiff serve``: the AUTOMATIC1111 web API, an OpenAI-style endpoint and a web page.

fastapi, uvicorn and torch are imported inside the command, so ``minidiff --help`` stays fast.
The server itself lives in ``minidiff_cli/server``; this module only reads the flags, loads the
first model (so a broken one is one line before anything listens), prints where to go, and runs
uvicorn until Ctrl-C.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.options import threads_option
from minidiff_cli.errors import MinidiffError
from minidiff_cli.runtime.threads import apply_threads

# An idle client connection is kept 30 s (AUTOMATIC1111's default), not uvicorn's 5: a client that
# reuses its connection just as the server drops it gets "connection reset", and clients that pause
# a few seconds between requests (a script drawing, a person reading) would meet that often.
KEEP_ALIVE_S = 30


@app.command("serve")
def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network "
                             "(use --token then)."),
    port: int = typer.Option(7860, "--port", help="Port (AUTOMATIC1111's is 7860)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", autocompletion=completion.models,
                                        help="The model served first [default: the shipped model]; clients "
                                        "switch among installed models by name."),
    token: Optional[str] = typer.Option(None, "--token", envvar="MINIDIFF_SERVE_TOKEN", show_envvar=True,
                                        help="Ask every request but the page for 'Authorization: Bearer TOKEN'."),
    api_auth: Optional[str] = typer.Option(None, "--api-auth", help="USER:PASSWORD for basic auth, as "
                                           "AUTOMATIC1111's --api-auth (webuiapi's username/password)."),
    cors: Optional[list[str]] = typer.Option(None, "--cors", help="Allow web pages from this origin (e.g. "
                                             "http://localhost:3000) to call the API; repeatable [default: none]."),
    save_dir: Optional[Path] = typer.Option(None, "--save-dir", help="Also write every picture served here, "
                                            "numbered [default: nothing is written]."),
    queue: int = typer.Option(8, "--queue", help="Jobs that may wait per model; more are answered 503 "
                              "with Retry-After."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Serve the AUTOMATIC1111 web API (/sdapi/v1), OpenAI's /v1/images/generations and a web page at /.

    Examples:

      minidiff serve                       # then open http://127.0.0.1:7860/

      minidiff serve --model emoji --port 7861

      minidiff serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    _check_flags(host, port, api_auth, queue, cors)
    _check_free(host, port)
    apply_threads(threads)
    import uvicorn

    from minidiff_cli.files.atomic import ensure_writable_dir
    from minidiff_cli.files.models_dir import resolve_model
    from minidiff_cli.server.app import Settings, create_app
    from minidiff_cli.server.catalogue import Catalogue, entry_for_path
    from minidiff_cli.server.jobs import stop_soon

    if save_dir is not None:
        ensure_writable_dir(save_dir)
    catalogue = Catalogue()
    entry = entry_for_path(resolve_model(model), catalogue)
    if entry.where == "command line":
        catalogue.extra = entry  # served by its name, though not in a model folder
    settings = Settings(entry, catalogue, device, dtype, token, api_auth, list(cors or []), save_dir, queue)
    server_app = create_app(settings)
    state = server_app.state.minidiff
    pipe = state.preload(entry).result()  # a broken model is one line now, not an error per request

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C: running jobs answer with what they have, then stop
            stop_soon(state.board)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(server_app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10,
                            timeout_keep_alive=KEEP_ALIVE_S, lifespan="on")
    _banner(host, port, entry, pipe, token, api_auth, cors, save_dir)
    Server(config).run()


def _check_free(host: str, port: int) -> None:
    """Bind once before loading anything, so a taken port or a wrong address is one line."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MinidiffError(f"--host '{host}' is not an address this machine knows ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise MinidiffError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _check_flags(host: str, port: int, api_auth: str | None, queue: int, cors: list[str] | None) -> None:
    if not 1 <= port <= 65535:
        raise MinidiffError(f"--port must be from 1 to 65535 (got {port})")
    if api_auth is not None and (":" not in api_auth or not api_auth.split(":", 1)[0]):
        raise MinidiffError("--api-auth takes USER:PASSWORD")
    if not 1 <= queue <= 1000:
        raise MinidiffError(f"--queue must be from 1 to 1000 (got {queue})")
    for origin in cors or []:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise MinidiffError(f"--cors takes an origin such as http://localhost:3000 (got '{origin}')")
    if not host or any(c.isspace() for c in host):
        raise MinidiffError(f"--host must be an address (got '{host}')")


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _banner(host, port, entry, pipe, token, api_auth, cors, save_dir) -> None:
    """The start-up lines: where to go, what is served on what, and a loud warning for an open server."""
    import torch
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/"
    size = pipe.model.image_size
    console.print(f"[bold]minidiff serve[/bold]  {url}  (open it in a browser; Ctrl-C stops)")
    console.print(f"  model    {entry.name} ({size}x{size}, {entry.where}, hash {entry.hash})")
    console.print(f"  device   {pipe.device}, {torch.get_num_threads()} CPU thread(s), {pipe.dtype}".replace("torch.", ""))
    console.print("  API      /sdapi/v1/... (AUTOMATIC1111), /v1/images/generations (OpenAI)")
    auth = " and ".join(x for x in ("Bearer token" if token else "", "basic auth" if api_auth else "") if x)
    console.print(f"  auth     {auth or 'none'}; CORS {', '.join(cors) if cors else 'off'}; "
                  f"saving {save_dir if save_dir else 'nothing'}")
    if not _is_local(host) and not (token or api_auth):
        console.print(f"[bold red]WARNING: listening on {host} without --token: anyone who can reach this "
                      "machine can use it (and its CPU or GPU). Pass --token T or --api-auth USER:PASSWORD.[/bold red]")
