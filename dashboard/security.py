"""Who may use the dashboard: whoever holds the token it printed.

Rules (checked for every request before any route runs):

1. Every request carries the token, in the URL (`?token=...`, what the
   printed link holds) or in the `X-Peerdrive-Token` header. Without it, or
   with a wrong one: 403, and nothing else is said.
2. A request that changes something (any method but GET and HEAD) must carry
   the token in the header. A link or a cross-site form post can put the token
   in a URL or a form field, but no page of another origin can set a custom
   header on a request here without a CORS preflight, which this server never
   grants: such requests are refused with 403, so there is no CSRF.
3. Every answer says: no caching, no referrer (the token is in the URL), no
   framing, and scripts, styles and connections from this origin only.

The token is 32 random bytes, compared in constant time. The server binds to
loopback unless told otherwise.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import parse_qs

TOKEN_HEADER = "x-peerdrive-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})

SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def allowed(method: str, query_token: str | None, header_token: str | None,
            token: str) -> bool:
    """Rules 1 and 2 as a pure decision."""
    if method in SAFE_METHODS:
        return _same(query_token, token) or _same(header_token, token)
    return _same(header_token, token)


class TokenGate:
    """ASGI middleware applying the rules above to every HTTP request."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        query_token = query.get("token", [None])[-1]
        header_token = None
        for name, value in scope.get("headers", []):
            if name == TOKEN_HEADER.encode():
                header_token = value.decode("latin-1")
        if not allowed(scope["method"], query_token, header_token, self.token):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    *SECURITY_HEADERS]})
            await send({"type": "http.response.body", "body": b"forbidden\n"})
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
