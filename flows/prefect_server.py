"""The flows' temporary Prefect server: started by the process that runs the flows, and gone with it, even when
that process is killed with SIGKILL.

Without PREFECT_API_URL, Prefect 3.8's client starts a temporary ("ephemeral") server itself:
`python -m uvicorn --factory prefect.server.api.server:create_app` in a subprocess
(`prefect.server.api.server.SubprocessASGIServer`), stopped only by an `atexit` hook. A killed flow process runs
no hook, and that server lived on as an orphan holding its port and the SQLite database. Prefect's Popen takes
no `preexec_fn` and runs none of our code in the child, so neither Linux's parent-death signal nor a watchdog can
be put into it, and no Prefect setting ties the server's life to its client's.

So the flows' entry points (`cirflow flow`, the demo) start the server here and point PREFECT_API_URL at it for
the run; Prefect then starts nothing. The server is this module run as a script: Prefect's own app
(`create_app(ephemeral=True)`: no UI, the background services Prefect runs in its temporary servers) under
uvicorn, on a socket the parent bound to a free loopback port (no race for the port), with a watchdog thread
that stops the server once its parent is gone. The watchdog polls `os.getppid()`: a dead parent's children are
re-parented, whatever killed it. Linux's PR_SET_PDEATHSIG would be quicker, but it fires when the *thread* that
started the child ends (a flow started from a short-lived thread would lose its server) and is Linux-only; a
poll of a few times a second costs nothing next to a server.

The temporary server sends no analytics (PREFECT_SERVER_ANALYTICS_ENABLED=false, forced): its heartbeat is the
only call out to the internet, and it is also what logged "database is locked": at start the heartbeat reads,
then writes its session row in one deferred SQLite transaction; when another connection (block registration,
the client's first requests) commits in between, SQLite answers SQLITE_BUSY at once, without waiting out
Prefect's busy_timeout, and docket logs the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Prefect's app, its migrations and services take 5-20 s to start on 2 cores; Prefect's own default (20 s) is
# too close to that.
STARTUP_TIMEOUT_SECONDS = 120.0
PARENT_POLL_SECONDS = 0.25  # how often the server checks that its parent lives
SHUTDOWN_GRACE_SECONDS = 3.0  # uvicorn's graceful stop, then the server exits regardless
STOP_TIMEOUT_SECONDS = 5.0  # a normal exit: SIGTERM, then SIGKILL after this
DRAIN_TIMEOUT_SECONDS = 10.0  # at most this long to send the run's last logs and events

# The temporary server's settings: no UI (Prefect's own temporary server runs none either) and no analytics.
SERVER_ENV = {"PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@contextlib.contextmanager
def prefect_api(startup_timeout: float = STARTUP_TIMEOUT_SECONDS) -> Iterator[str]:
    """The Prefect API URL for the flows run inside: the configured one (PREFECT_API_URL in the environment,
    the Prefect profile, or a settings context such as a test harness's), or else a temporary server's, started
    here and stopped at the exit (or by its watchdog when this process dies)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    # The server inherits this process's Prefect settings (its database and home above all), as Prefect's would.
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True), **SERVER_ENV}
    with _serve(env, startup_timeout) as url, temporary_settings(updates={PREFECT_API_URL: url}):
        try:
            yield url
        finally:
            _drain_workers()


def _drain_workers() -> None:
    """Send the run's queued logs and events before the server stops (as Prefect's test harness does): left to
    Prefect's exit hooks, they met a stopped server ("Error logging to API"), once holding the exit for a
    minute. Synchronous callers only (in a running event loop drain_all returns a coroutine)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=DRAIN_TIMEOUT_SECONDS)
    EventsWorker.drain_all(timeout=DRAIN_TIMEOUT_SECONDS)


@contextlib.contextmanager
def _serve(env: dict[str, str], startup_timeout: float) -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
        fd = sock.fileno()
        cmd = [sys.executable, "-m", "cirflow.flows.prefect_server", "--parent", str(os.getpid()), "--fd", str(fd)]
        # Its own session: a Ctrl-C at the terminal interrupts the flows, which then report the crash to a server
        # still up and stop it here; a parent killed outright is the watchdog's job.
        proc = subprocess.Popen(cmd, pass_fds=(fd,), env=env, start_new_session=True)
    log.info("temporary Prefect server on %s (pid %d; it stops when this process ends)", url, proc.pid)
    try:
        _wait_healthy(url, proc, startup_timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect server on {url} did not answer within {timeout:g} s")


def _watch_parent(parent: int) -> None:
    """SIGTERM to this process once `parent` is no longer its parent (uvicorn stops gracefully; before uvicorn
    runs, the signal ends the process); exit regardless if it lingers."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(SHUTDOWN_GRACE_SECONDS)
    os._exit(1)


def main(argv: list[str] | None = None) -> None:
    """The server process: Prefect's API app on the inherited socket, until SIGTERM or the parent is gone."""
    parser = argparse.ArgumentParser(prog="python -m cirflow.flows.prefect_server")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process the server lives for")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket, bound to the server's address")
    args = parser.parse_args(argv)
    # Watching from the start: Prefect's imports alone take seconds, and the parent may die meanwhile.
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="parent-watch").start()
    import uvicorn
    from prefect.server.api.server import create_app

    config = uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error", lifespan="on")
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
