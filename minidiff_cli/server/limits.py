"""Every size a client controls, bounded before any work; and the request body limit itself.

A request is refused (413 for the body, 422 for a field) before anything is decoded, loaded or
sampled: the numbers below are what one request may ask for. The body limit is a plain ASGI
middleware that counts bytes as they arrive, so a client that lies about (or omits)
Content-Length is cut off at the limit too, without the body being held in memory first.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 16 * 1024 * 1024       # a request body: two base64 pictures of a few MB each
MAX_BASE64_CHARS = 12 * 1024 * 1024     # one base64 picture (about 9 MB decoded)
MAX_PICTURE_PIXELS = 4096 * 4096        # a decoded init image or mask (data.images.check_picture bounds it too)
MAX_STEPS = 1000                        # and the model's own T, checked when the job runs
MAX_IMAGES = 16                         # batch_size x n_iter (OpenAI: n) per request
MAX_SIDE = 2048                         # width and height of a returned picture
MAX_OUTPUT_PIXELS = 16 * 1024 * 1024    # all returned pictures of one request together
MAX_PROMPT_CHARS = 10_000               # inference.pipeline.MAX_PROMPT_CHARS, without importing torch here
MAX_SEED = 2**64 - 1                    # inference.pipeline.MAX_SEED
MAX_CFG = 1000.0                        # inference.pipeline.MAX_CFG
MAX_NAME_CHARS = 200                    # a model or sampler name


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 in one line, and never read whole."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(send, self.limit)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await too_large(send, self.limit)


class BodyTooLarge(HTTPException):
    """Raised inside the app when the streamed body passes the limit: an HTTPException, so that
    FastAPI's body reader lets it through (it turns other errors into a 400) and answers 413."""

    def __init__(self, limit: int = MAX_BODY_BYTES):
        super().__init__(413, f"the request body is larger than {limit // (1024 * 1024)} MB")


async def too_large(send, limit: int) -> None:
    await send_json(send, 413, {"error": "PayloadTooLarge",
                                "detail": f"the request body is larger than {limit // (1024 * 1024)} MB"})


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    """A whole JSON answer from plain ASGI (middleware answers before FastAPI is reached)."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
