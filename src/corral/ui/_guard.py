"""Who may see the dashboard, and what the browser may do with its pages.

The dashboard shows every command, connection and alert of every sandbox: on loopback only, by
default, and anywhere else only behind a token. The token comes as `Authorization: Bearer T`
(scrapers, scripts) or once as `?token=T`, which sets an HttpOnly, SameSite=Strict cookie and
redirects to the same page without it (so the token does not stay in the address bar or history).

Every response carries a Content-Security-Policy that allows only the dashboard's own scripts,
styles and images: an event's text that slipped past escaping still could not run a script or
send anything anywhere."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral._errors import CorralError

COOKIE = "corral_ui_token"
TOKEN_ENV = "CORRAL_UI_TOKEN"
DEFAULT_LISTEN = "127.0.0.1:8765"

HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class ListenError(CorralError):
    """`corral ui` was asked to listen somewhere it must not, or somewhere it can't parse."""


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv6 host in brackets) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ListenError(f"--listen {listen}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host.removeprefix("[").removesuffix("]")
    number = int(port)
    if not 0 < number < 65536:
        raise ListenError(f"--listen {listen}: port {number} is not between 1 and 65535")
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve to anything


def check_listen(listen: str, token: str | None) -> tuple[str, int]:
    """Where to listen; refuses a non-loopback address without a token."""
    host, port = parse_listen(listen)
    if not is_loopback(host) and not token:
        raise ListenError(
            f"--listen {listen}: not a loopback address, and no token: anyone who can reach it would "
            f"see every sandbox's commands and alerts. Give --token (or set {TOKEN_ENV}), or listen "
            "on 127.0.0.1"
        )
    return host, port


class Guard:
    """ASGI middleware: the token check (when there is a token) and the security headers."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        # The cookie holds a digest of the token, not the token: it is always cookie-safe text, and
        # the token itself is never written to the browser's cookie jar.
        self.cookie = hashlib.sha256(b"corral-ui-cookie\n" + self.token).hexdigest() if self.token else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        if self.token is not None:
            verdict = self._check(scope)
            if verdict != "ok":
                await self._refuse(scope, send_with_headers, verdict)
                return
        await self.app(scope, receive, send_with_headers)

    def _check(self, scope: Scope) -> str:
        """'ok', 'cookie' (a right ?token=: set the cookie and redirect) or 'no'."""
        assert self.token is not None
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self.token):
            return "ok"
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:  # a malformed Cookie header is no token
            cookie = SimpleCookie()
        if COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value.encode(), self.cookie.encode()):
            return "ok"
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        given = query.get("token")
        if given is not None and hmac.compare_digest(given.encode(), self.token):
            return "cookie"
        return "no"

    async def _refuse(self, scope: Scope, send: Send, verdict: str) -> None:
        if verdict == "cookie":
            assert self.token is not None
            query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode()) if k != "token"]
            location = scope.get("root_path", "") + scope["path"] + ("?" + urlencode(query) if query else "")
            cookie = f"{COOKIE}={self.cookie}; HttpOnly; SameSite=Strict; Path=/"
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [
                        (b"location", location.encode()),
                        (b"set-cookie", cookie.encode()),
                        (b"cache-control", b"no-store"),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        body = b"401: this dashboard needs its token (Authorization: Bearer TOKEN, or ?token=TOKEN once)\n"
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"www-authenticate", b'Bearer realm="corral"'),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
