"""``--token T`` (``Authorization: Bearer T``) and ``--api-auth user:password`` (basic auth, which
``webuiapi`` sends): every path but the page itself (``/`` and its static files) needs one.

Compared in constant time. A plain ASGI middleware, so it answers before the body is read, and
CORS preflight requests (which browsers send without credentials) are answered by the CORS
middleware outside it.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from minidiff_cli.server.limits import send_json

OPEN_PATHS = ("/", "/favicon.ico")
OPEN_PREFIXES = ("/page/",)


class Auth:
    def __init__(self, app, token: str | None = None, basic: str | None = None):
        self.app = app
        self.token = token
        self.basic = basic  # "user:password"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed(scope):
            return await self.app(scope, receive, send)
        schemes = ([b"Bearer"] if self.token else []) + ([b'Basic realm="minidiff"'] if self.basic else [])
        await send_json(send, 401, {"error": "Unauthorized",
                                    "detail": "this server needs " + " or ".join(
                                        s.split(b" ")[0].decode() for s in schemes) + " authorization"},
                        headers=[(b"www-authenticate", s) for s in schemes])

    def allowed(self, scope) -> bool:
        if not (self.token or self.basic):
            return True
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        return self.check(header)

    def check(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer" and self.token:
            return hmac.compare_digest(value, self.token.encode())
        if scheme.lower() == b"basic" and self.basic:
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(given, self.basic.encode())
        return False
