"""The search service as an origin on the open web: response headers, the optional API key, and the API docs
served from the package (no CDN).

Headers on every response: `X-Content-Type-Options: nosniff` (a browser takes the content type as sent and never
guesses HTML from bytes), a Content-Security-Policy that allows scripts from this origin's files only (no inline
script, no eval, no other host), `frame-ancestors 'none'` (no clickjacking), and `Referrer-Policy: no-referrer`.
Inline *styles* are allowed: Swagger UI sets them; a style cannot run code.

The API key (ServiceConfig.api_key, read by `read_api_key` from a file or CIRFLOW_API_KEY) guards search, the
items and /api/info as a bearer token, compared in constant time; the probes (/healthz, /readyz, /metrics), the
page and the docs stay open, since they carry no catalog data. TLS and rate limits belong to the ingress in
front of the service (deploy/README.md).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Mapping

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

API_KEY_ENV = "CIRFLOW_API_KEY"
MIN_KEY_CHARS = 16
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
       "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", CSP.encode()),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
PAGE_DIR = Path(__file__).parent / "page"
# Swagger UI 5's files, shipped inside the fastapi-offline wheel (FastAPI's own /docs loads them from a CDN).
DOCS_ASSETS = {"swagger-ui-bundle.js": "application/javascript", "swagger-ui.css": "text/css"}


class ApiKeyError(ValueError):
    """The API key cannot be used as configured; the message names its source."""


def check_api_key(key: str | None, source: str = "api_key") -> None:
    if key is None:
        return
    if len(key) < MIN_KEY_CHARS or any(c.isspace() or not c.isprintable() for c in key):
        raise ApiKeyError(f"{source}: an API key is at least {MIN_KEY_CHARS} printable characters without spaces "
                          f"(got {len(key)} characters); make one with `openssl rand -hex 32`")


def read_api_key(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """The key from `path` (one line; a trailing newline is dropped) or else from CIRFLOW_API_KEY; None: no key."""
    if path is not None:
        try:
            key, source = Path(path).read_text().rstrip("\r\n"), f"API key file {path}"
        except (OSError, UnicodeDecodeError) as e:
            raise ApiKeyError(f"API key file {path}: cannot read it ({e})") from e
    elif environ.get(API_KEY_ENV):
        key, source = environ[API_KEY_ENV], API_KEY_ENV
    else:
        return None
    check_api_key(key, source)
    return key


def require_key(key: str) -> Any:
    """A route dependency: 401 unless the request carries `Authorization: Bearer <key>`. Built on FastAPI's
    HTTPBearer so that the OpenAPI schema declares the scheme (the docs page's Authorize button)."""
    expected = key.encode()
    bearer = HTTPBearer(auto_error=False, description="the service's API key (ServiceConfig.api_key)")

    async def guard(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "this service needs an API key: send the header `Authorization: Bearer "
                                     "<key>`", headers={"WWW-Authenticate": "Bearer"})

    return guard


class SecurityHeadersMiddleware:
    """Adds HEADERS to every HTTP response (errors and static files included), replacing any of the same name."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in HEADERS}
                message["headers"] = [h for h in message.get("headers", []) if h[0].lower() not in names] + HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def add_docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI from the installed fastapi-offline files, started by page/docs.js (no inline script,
    so it runs under the CSP above)."""
    from importlib.resources import files

    assets = Path(str(files("fastapi_offline") / "static"))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "docs.html").read_text())

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if name not in DOCS_ASSETS:
            raise HTTPException(404, f"no docs asset {name!r}")
        return FileResponse(assets / name, media_type=DOCS_ASSETS[name],
                            headers={"Cache-Control": "max-age=86400"})

