"""The service's access log: one INFO line per HTTP request, worded as uvicorn's own access log
(`127.0.0.1:51234 - "POST /search HTTP/1.1" 200`), written once the response has gone out.

uvicorn writes its line before the response's first byte. Making a log record with the logging code gone cold
during a search took ~0.2 ms on the 2-core bench machine (bench/service.py), added to every answer; after the
response it costs the client nothing. `cirflow serve` turns uvicorn's line off (which also silences the
`uvicorn.access` logger) and this one on (create_app(access_log=True)).
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from cirflow.indexing.service.metrics import StatusOf

log = logging.getLogger(__name__)


class AccessLogMiddleware:
    """ASGI middleware writing the access-log line of every HTTP request after its response (a plain ASGI class, as
    MetricsMiddleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = StatusOf(send)
        try:
            await self.app(scope, receive, sent)
        finally:
            log.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"],
                     get_path_with_query_string(scope), scope["http_version"], sent.status)
