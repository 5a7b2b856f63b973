"""A store whose reads can be held: an HTTP server on 127.0.0.1 that every process reaches through fsspec's http
filesystem (the job's driver, a subprocess, the Ray workers of any node), for the tests that kill a job or a node
while a read is in flight. A FIFO served that purpose until the image gate (models/images.py) refused whatever
is not a regular file without waiting for a writer: a hung object-store read is what remains that blocks."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa


class HeldStore:
    """Serves `files` (name -> bytes) at uri(name); a GET of a held name waits until release() (a HEAD never
    waits: fsspec asks for the size before it opens a file)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.held: set[str] = set()
        self.waiting = 0  # GETs held right now
        self.condition = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def uri(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{name}"

    def hold(self, *names: str) -> None:
        with self.condition:
            self.held.update(names)

    def release(self) -> None:
        """Answer the held GETs and every later one."""
        with self.condition:
            self.held.clear()
            self.condition.notify_all()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _handler(store: HeldStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            name = self.path.lstrip("/")
            with store.condition:
                held = name in store.held
                store.waiting += held
                store.condition.wait_for(lambda: name not in store.held)
                store.waiting -= held
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            data = store.files.get(self.path.lstrip("/"))
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "none")  # fsspec then streams one GET instead of range requests
            self.end_headers()
            if body:
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the reader was killed while held
                    pass

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            pass

    return Handler


def held_entry(table: pa.Table, row: int) -> tuple[HeldStore, pa.Table]:
    """A store holding the read of catalog row `row`'s file, and `table` (id, uri, ...) with that row's uri
    pointing at the store: a job embedding it blocks there until release()."""
    path = Path(table.column("uri")[row].as_py())
    store = HeldStore({path.name: path.read_bytes()})
    store.hold(path.name)
    uris = table.column("uri").to_pylist()
    uris[row] = store.uri(path.name)
    return store, table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))
