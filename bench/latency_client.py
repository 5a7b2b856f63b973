"""A search client in its own process, for bench/lifecycle.py: it posts the given request bodies to POST /search
round-robin, paced at --rate requests per second, one at a time, and logs every request as one JSON line.

    .venv/bin/python bench/latency_client.py --url http://127.0.0.1:8000 --bodies BODIES.jsonl --log LOG.jsonl

Its own process, not a thread of the bench's: the flows' Python work in the bench process would delay a thread's
sends and reads through the GIL and skew the very latencies it measures. Pacing: each request is sent 1/rate
after the previous one was sent, or as soon as the previous answer came back when that took longer (one
connection, kept alive; no bursts to catch up). A stall is thus seen by one slow request, not by the many that
users would have sent meanwhile (coordinated omission): p99 under a long stall is understated.

A log line: {"sent": wall-clock seconds (time.time(), comparable with the bench's), "ms": send to answer parsed,
"status": HTTP status (0: transport error), "index_id": the version that answered, "server_ms": its took_ms.total}.
Lines are flushed as written; SIGTERM ends the client after the request in flight.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

import httpx

REQUEST_TIMEOUT = 60.0


def run(url: str, bodies: list[bytes], log: Path, rate: float) -> int:
    """Post until SIGTERM; returns the number of requests sent."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    interval, sent = 1.0 / rate, 0
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False) as client, open(log, "a", buffering=1) as out:
        next_send = time.monotonic()
        while not stopping:
            pause = next_send - time.monotonic()
            if pause > 0:
                time.sleep(pause)
                if stopping:
                    break
            next_send = time.monotonic() + interval
            wall, start = time.time(), time.perf_counter()
            record = {"sent": wall, "status": 0, "index_id": None, "server_ms": None}
            try:
                response = client.post(f"{url}/search", content=bodies[sent % len(bodies)], headers=headers)
                record["status"] = response.status_code
                if response.status_code == 200:
                    answer = response.json()
                    record["index_id"], record["server_ms"] = answer["index_id"], answer["took_ms"]["total"]
            except (httpx.HTTPError, ValueError, KeyError) as e:
                record["error"] = type(e).__name__
            record["ms"] = 1000 * (time.perf_counter() - start)
            out.write(json.dumps(record) + "\n")
            sent += 1
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the service's base URL")
    parser.add_argument("--bodies", type=Path, required=True, help="JSON lines: one POST /search body each")
    parser.add_argument("--log", type=Path, required=True, help="JSON lines appended, one per request")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second at most")
    args = parser.parse_args()
    if args.rate <= 0:
        raise SystemExit(f"--rate must be positive, got {args.rate}")
    bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    if not bodies:
        raise SystemExit(f"--bodies {args.bodies}: no request body")
    run(args.url, bodies, args.log, args.rate)


if __name__ == "__main__":
    main()
