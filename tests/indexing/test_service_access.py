"""indexing/service/access.py: the access-log line, worded as uvicorn's, written after the response went out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cirflow.indexing.service.access import AccessLogMiddleware

LOGGER = "cirflow.indexing.service.access"


def http_scope(path: str, query: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "query_string": query,
            "client": ("127.0.0.1", 51234), "headers": []}


def call(app: Any, scope: dict[str, Any], sent: list[dict[str, Any]] | None = None) -> None:
    """Run the middleware around `app` once; the messages it sends are appended to `sent`."""
    sent = [] if sent is None else sent

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(AccessLogMiddleware(app)(scope, receive, send))


async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 422, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_the_line_is_uvicorns_and_follows_the_response(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[dict[str, Any]] = []
    written_after: list[int] = []  # messages sent when the line was written

    class Counting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written_after.append(len(sent))

    access = logging.getLogger(LOGGER)
    access.addHandler(counting := Counting())
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            call(answer, http_scope("/items/a b\n", b"limit=5"), sent)
    finally:
        access.removeHandler(counting)
    assert written_after == [2]  # the response's start and its body
    assert caplog.messages == ['127.0.0.1:51234 - "POST /items/a%20b%0A?limit=5 HTTP/1.1" 422']  # a path is quoted


def test_a_request_that_fails_before_answering_is_logged_as_a_500(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(RuntimeError, match="boom"):
        call(broken, http_scope("/search"))
    assert caplog.messages == ['127.0.0.1:51234 - "POST /search HTTP/1.1" 500']


def test_other_scopes_pass_through_without_a_line(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    with caplog.at_level(logging.INFO, logger=LOGGER):
        call(app, {"type": "lifespan"})
    assert seen == ["lifespan"] and caplog.messages == []
