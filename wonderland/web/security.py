"""Who may drive the local server: Host and Origin checks, and the token for non-loopback binds.

A server on 127.0.0.1 is still reachable by every web page the user opens: a page on
``evil.example`` can POST to ``http://127.0.0.1:7860`` (cross-site request) or rebind its own
DNS name to 127.0.0.1 and read our answers (DNS rebinding). Two checks close both doors:

* **Host**: on a loopback bind the ``Host`` header must name a loopback host, so a rebound
  ``evil.example`` is refused before any route runs;
* **Origin**: a request that carries an ``Origin`` (or ``Sec-Fetch-Site``) header must come from
  this very origin. Requests without one come from non-browser clients (curl, the OpenAI SDK),
  which no web page can forge.

When ``--host`` opens the server to the network, every request additionally needs the token,
given once as ``?token=...`` (then kept in an HttpOnly, SameSite=Strict cookie) or as an
``Authorization: Bearer`` header (API clients).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from flask import Flask, Request, jsonify, redirect, request

TOKEN_COOKIE = "wonderland_token"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """``Host`` header -> lower-case host name without port (``[::1]:7860`` -> ``::1``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class Guard:
    """The access policy of one app: allowed Host names (None = any) and an optional token."""

    allowed_hosts: frozenset[str] | None = field(default=frozenset())  # besides loopback names; None = any
    token: str | None = None

    @classmethod
    def for_bind(cls, host: str, token: str | None) -> "Guard":
        """Loopback bind: loopback Host names only. Wildcard bind: any Host (the token guards).
        A specific address: that address and the loopback names."""
        if is_loopback(host):
            return cls(frozenset(), token)
        if host in ("0.0.0.0", "::", ""):
            return cls(None, token)
        return cls(frozenset({host.strip("[]").lower()}), token)

    def refusal(self, req: Request) -> tuple[int, str] | None:
        """Why ``req`` must be refused (status, message), or None when it may proceed."""
        name = host_name(req.host)
        if self.allowed_hosts is not None and name not in self.allowed_hosts and not is_loopback(name):
            return 403, f"Host {req.host!r} is not allowed; open the app at http://127.0.0.1 (DNS-rebinding protection)"
        origin = req.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or parts.netloc.lower() != req.host.lower() or parts.scheme != req.scheme:
                return 403, "cross-origin request refused: only pages served by this app may call its API"
        if req.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            return 403, "cross-site request refused: only pages served by this app may call its API"
        if self.token and not req.path.startswith("/static/") and not self._has_token(req):
            return 401, "this server needs its access token: open the URL printed by `wonderland serve` (…/?token=…)"
        return None

    def _has_token(self, req: Request) -> bool:
        given = [req.cookies.get(TOKEN_COOKIE, ""), req.args.get("token", "")]
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[len("Bearer "):].strip())
        return any(g and hmac.compare_digest(g.encode(), self.token.encode()) for g in given)

    def install(self, app: Flask) -> None:
        @app.before_request
        def _check():
            refused = self.refusal(request)
            if refused:
                status, message = refused
                return jsonify(error=message), status
            if self.token and request.method == "GET" and request.args.get("token") and not request.path.startswith("/api/"):
                # Swap the URL token for a cookie, and drop it from the address bar and history.
                response = redirect(request.path)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
                return response
            return None

        @app.after_request
        def _headers(response):
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Referrer-Policy", "no-referrer")
            response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
            # No inline or foreign scripts: model text can never become code even if a bug let it into markup.
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                "frame-ancestors 'self'; base-uri 'none'; form-action 'self'")
            return response
