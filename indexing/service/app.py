"""The search service: HTTP in front of the one query path (bundle runtime -> published FAISS index).

    app = create_app(ServiceConfig(index=Path("workdir/indexes/shapes-shop")))   # cirflow serve runs it

Endpoints: POST /search (composed, image-only or text-only; JSON or multipart), GET /items, /items/{id},
/items/{id}/image, /api/info, /healthz (alive), /readyz (a version is loaded), /metrics (Prometheus), the
OpenAPI schema at /openapi.json (/docs to try it), and the search page at /. The index and bundle load in the
lifespan; the watcher (state.Published) swaps in new index versions while requests keep flowing.

The service is an origin on the open web (indexing/service/security.py: headers, API key, offline docs). Whatever a
catalog or a request holds is hostile: uploads go through the image gate (models/images.py: size, pixels,
format allow-list, any decoder failure a 4xx), and an item's image is served only when its bytes are still
those the snapshot embedded (their sha256), with the content type of the format they decoded as, never one
guessed from the file name (a PNG named x.html must not become a page on this origin).

Checking, decoding, encoding and searching block, so they run in a thread pool of `ServiceConfig.threads`; each
request uses one ONNX Runtime thread (ort_threads) and one FAISS thread (FAISS parallelises over the queries of
a call, and a request is one query), so concurrent requests fill the cores instead of contending inside one
call. A GPU index is searched by one request at a time (faiss's GPU resources are not thread-safe). Bad input
is a 4xx naming the field; an unexpected error is a 500 that is logged with its traceback, and the worker keeps
serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import faiss
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from cirflow.export.runtime import InputError
from cirflow.indexing.embedding.catalog import read_bytes
from cirflow.indexing.search import SearchError, UnknownIdError
from cirflow.indexing.search import index_store as store
from cirflow.indexing.search.searcher import rescore_candidates
from cirflow.indexing.search.sharded import PartialAnswer, ShardsUnavailableError
from cirflow.indexing.search.topk import drop_excluded
from cirflow.indexing.service.access import AccessLogMiddleware
from cirflow.indexing.service.metrics import MetricsMiddleware, ServiceMetrics
from cirflow.indexing.service.requests import (
    ANSWERS,
    Hit,
    Query,
    RequestError,
    SearchRequest,
    SearchResponse,
    Timing,
    check,
    field_message,
    parse_form,
    parse_json,
)
from cirflow.indexing.service.security import PAGE_DIR, SecurityHeadersMiddleware, add_docs, require_key
from cirflow.indexing.service.state import Published, ServiceConfig, Version, find_bundle
from cirflow.models.images import ImageError, ImageLimits, decode, mime_of, probe

log = logging.getLogger(__name__)

MAX_PAGE = 200  # GET /items: items per page


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes with 413: from Content-Length before reading anything, and by
    counting for chunked bodies, so an oversized upload is never held in memory whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse({"detail": _too_large(self.limit, length.decode("latin-1"))}, 413)
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int, length: str | None = None) -> str:
    size = f" ({length} bytes)" if length and length.isdigit() else ""
    return f"request body{size} is over this service's limit of {limit:,} bytes"


def create_app(config: ServiceConfig, published: Published | None = None, access_log: bool = False) -> FastAPI:
    """The app; `published` may be given to share or inspect the holder (tests, Ray Serve). access_log: write an
    access-log line per request (service/access.py; `cirflow serve`, where uvicorn's own line is off)."""
    published = published or Published(config)
    metrics = ServiceMetrics(published)
    pool = ThreadPoolExecutor(config.threads, thread_name_prefix="cirflow-search", initializer=_one_faiss_thread)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("search service: %d request threads, %d ONNX Runtime thread(s) and 1 FAISS thread per request",
                 config.threads, config.ort_threads)
        # Loading runs behind the open port: /healthz answers at once, /readyz once the version is in.
        loading = asyncio.get_running_loop().run_in_executor(pool, _load, published)
        try:
            yield
        finally:
            published.stop()
            loading.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cirflow search", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Composed image retrieval over a published catalog index: a reference image and a "
                              "modification text in, catalog items out.")
    app.state.published, app.state.metrics, app.state.config = published, metrics, config
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)  # times 413s too
    app.add_middleware(SecurityHeadersMiddleware)  # every response, a 413 or a 500 included
    if access_log:
        app.add_middleware(AccessLogMiddleware)  # outermost: its line follows all else the request did
    add_docs(app)
    # Search, the items and /api/info carry catalog data: behind the key when there is one. The probes, the
    # page and the docs stay open.
    guarded = [] if config.api_key is None else [Depends(require_key(config.api_key))]

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, e.status)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": _too_large(config.max_body_bytes)}, 413)

    def serving() -> Version:
        version = published.version
        if version is None:
            raise RequestError(503, f"not ready: {published.load_error or 'the index is still loading'} "
                                    "(GET /readyz)")
        return version

    async def run(function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    @app.post("/search", response_model=SearchResponse, openapi_extra=_search_body_schema(), dependencies=guarded,
              summary="Composed, image-only or text-only search",
              responses={413: {"description": "body or image over the limits"},
                         415: {"description": "neither JSON nor multipart"},
                         422: {"description": "a bad field; the message names it"}})
    async def search(request: Request) -> Response:
        version = serving()  # this request's version, whatever is swapped in meanwhile
        body, upload = await _read_search(request)
        if version.index.remote:  # shards on other machines: the request thread is not held while they answer
            started = time.perf_counter()
            query, encoded = await run(encode_query, version, body, upload, config, started)
            found = await _found_remote(version, encoded, query)
            json = await run(finish, version, query, encoded, found, metrics)
        else:
            json = await run(search_json, version, body, upload, config, metrics)
        # The JSON comes back ready: FastAPI passes a Response through, where it would validate a returned model
        # against response_model again (which stays, for the OpenAPI schema) before serialising it.
        return Response(json, media_type="application/json")

    @app.get("/items", dependencies=guarded, summary="Catalog items in id order (browse the catalog)")
    async def items(offset: int = 0, limit: int = 48) -> dict[str, Any]:
        version = serving()
        if not 1 <= limit <= MAX_PAGE:
            raise RequestError(422, f"limit: must be between 1 and {MAX_PAGE}, got {limit}")
        if offset < 0:
            raise RequestError(422, f"offset: must be >= 0, got {offset}")
        rows = version.index.entries.page(offset, limit) if offset < version.index.ntotal else []
        return {"items": [_public(row) for row in rows], "offset": offset, "total": version.index.ntotal,
                "index_id": version.index_id}

    @app.get("/items/{item_id}", dependencies=guarded, summary="A catalog item's uri and metadata")
    async def item(item_id: str) -> dict[str, Any]:
        version = serving()
        return {**_public(_item(version, item_id)), "index_id": version.index_id}

    @app.get("/items/{item_id}/image", dependencies=guarded, response_class=Response,
             summary="A catalog item's image bytes, while they are those the index embedded")
    async def item_image(item_id: str) -> Response:
        version = serving()
        data, media = await run(catalog_image, version, _number(item_id), config.images, "item", 404)
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=60"})

    @app.get("/api/info", dependencies=guarded, summary="The served version, query modes and request limits")
    async def info() -> dict[str, Any]:
        version = serving()
        return {"catalog": version.catalog, "index_id": version.index_id, "bundle_id": version.bundle_id,
                "vectors": version.index.ntotal, "index_type": version.index.manifest["type"],
                "metadata_fields": version.index.entries.fields, "modes": ANSWERS,
                "loaded_at": version.loaded_at, "reloads": dict(published.reloads),
                "limits": {"max_k": config.max_k, "max_body_bytes": config.max_body_bytes,
                           "max_image_bytes": config.images.max_bytes, "max_image_pixels": config.images.max_pixels,
                           "image_formats": list(config.images.formats), "max_text_chars": config.max_text_chars,
                           "max_ids": config.max_ids},
                # Where the model re-ranks (POST /search's rerank_n); absent otherwise, as before there were any.
                **({"reranker": {"default_n": runtime.rerank_n, "max_n": config.max_rerank_n}}
                   if (runtime := version.searcher.runtime).reranks else {})}

    @app.get("/healthz", summary="Liveness: the process answers (503 once the first load has failed)")
    async def healthz() -> JSONResponse:
        if published.load_error is not None:  # restarting is the way out (orchestrators act on liveness)
            return JSONResponse({"status": "failed", "detail": published.load_error}, 503)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", summary="Readiness: an index version is loaded and served")
    async def readyz() -> JSONResponse:
        version = published.version
        if version is None:
            detail = published.load_error or "loading the index and bundle"
            return JSONResponse({"ready": False, "detail": detail}, 503)
        return JSONResponse({"ready": True, "index_id": version.index_id, "bundle_id": version.bundle_id})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html")

    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")
    return app


def _one_faiss_thread() -> None:
    """Each request thread's initializer. One FAISS thread per call: a request is one query, and requests already
    run side by side. OpenMP keeps this setting per thread, so it is made in every request thread (made once on
    the event loop's thread, it reached none of them)."""
    faiss.omp_set_num_threads(1)


def _load(published: Published) -> None:
    """The first load, then the watcher; a failure is kept for /healthz and /readyz (the process stays up to
    say why; orchestrators restart it on the failing liveness probe)."""
    if published.version is None:
        try:
            published.load()
        except Exception as e:  # whatever stops the load: reported, not raised into a thread nobody joins
            published.load_error = f"cannot load {published.config.index}: {e}"
            log.exception("search service: %s", published.load_error)
            return
    published.start_watching()


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`cirflow serve`: check the paths (a clear error before the port opens), then run uvicorn until stopped."""
    import uvicorn

    index_dir = store.resolve_index_dir(Path(config.index))
    find_bundle(config, index_dir, store.read_manifest(index_dir)["bundle_id"])
    log.info("search service on http://%s:%d/ (page), /docs (API), /metrics", host, port)
    # In-flight requests finish on SIGTERM (a rolling update), within the grace period. The access log is the app's,
    # written after each response (service/access.py), not uvicorn's, written before it.
    uvicorn.run(create_app(config, access_log=True), host=host, port=port, timeout_graceful_shutdown=20,
                log_config=None, access_log=False)


async def _read_search(request: Request) -> tuple[SearchRequest, bytes | None]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return parse_json(await request.body()), None
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the second: a form with no file
        try:
            form = await request.form(max_files=1, max_fields=16)
        except MultiPartException as e:
            raise RequestError(400, f"multipart body: {e.message}") from e
        try:
            fields = {name: value for name, value in form.items() if isinstance(value, str)}
            files = {name: value for name, value in form.items() if isinstance(value, UploadFile)}
            unknown = sorted(set(files) - {"image"})
            if unknown:
                raise RequestError(422, f"{unknown[0]}: only one file, named `image`, is accepted")
            upload = await files["image"].read() if "image" in files else None
            return parse_form(fields, upload)
        finally:
            await form.close()
    raise RequestError(415, f"content type {kind or 'missing'!r}: send application/json (image_base64) or "
                            "multipart/form-data (an `image` file; form fields alone may also be urlencoded)")


def _number(item_id: str) -> int:
    try:
        return int(item_id)
    except ValueError as e:
        raise RequestError(422, f"item id {item_id!r} is not an integer") from e


def _item(version: Version, item_id: str) -> dict[str, Any]:
    try:
        return version.index.entries.item(_number(item_id))
    except UnknownIdError as e:
        raise RequestError(404, str(e)) from e


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """An item as JSON: the 63-bit id as a string, and where its image is served."""
    return {**row, "id": str(row["id"]), "image": f"/items/{row['id']}/image"}


@dataclass(frozen=True)
class Encoded:
    """A checked query's vector, the ids its results may have (None: any), and when each stage before the search
    began and ended (perf_counter). features: the re-ranker's, where this query re-ranks (None: it does not)."""

    vector: np.ndarray
    allow: np.ndarray | None
    started: float
    decoded: float
    encoded: float
    features: np.ndarray | None = None


@dataclass(frozen=True)
class Found:
    """A search's best ids and scores (k of them; a re-ranked query's index stage: its candidates), the shards of
    a sharded version that did not answer (the answer is then partial; none: whole), and the re-rank stage's
    candidate count and end (perf_counter), where it ran."""

    ids: np.ndarray
    scores: np.ndarray
    missing: tuple[int, ...] = ()
    reranked: int = 0
    searched: float = 0.0


def search_json(version: Version, request: SearchRequest, upload: bytes | None, config: ServiceConfig,
                metrics: ServiceMetrics) -> str:
    """POST /search's work in one trip to the thread pool (a trip cost the event loop ~0.15 ms of CPU on the 2-core
    bench machine): the checks (which decode an uploaded image), the search, the stage metrics and the JSON."""
    query, encoded = encode_query(version, request, upload, config, time.perf_counter())
    return finish(version, query, encoded, _found(version, encoded, query), metrics)


def finish(version: Version, query: Query, encoded: Encoded, found: Found, metrics: ServiceMetrics) -> str:
    """After the index's search: the re-rank stage where the query re-ranks, then the response's JSON."""
    return response_json(version, query, encoded, _rerank(version, encoded, found, query), metrics)


def answer(version: Version, query: Query, limits: ImageLimits) -> SearchResponse:
    """Encode and search one checked query against one version of an index in this process."""
    encoded = encode(version, query, limits, time.perf_counter())
    return response(version, query, encoded, _rerank(version, encoded, _found(version, encoded, query), query))


def encode_query(version: Version, request: SearchRequest, upload: bytes | None, config: ServiceConfig,
                 started: float) -> tuple[Query, Encoded]:
    """A request's checks (which decode an uploaded image; `started` is when they began) and its query's vector."""
    query = check(request, upload, config)
    return query, encode(version, query, config.images, started)


def encode(version: Version, query: Query, limits: ImageLimits, started: float) -> Encoded:
    """The vector of one checked query, a reference_id's catalog image decoded first (through the image gate,
    within `limits`), and the ids its results may have; runs in the thread pool. started: the start of
    took_ms.total and .decode."""
    runtime = version.searcher.runtime
    allow = _allowed(version, query)
    image = query.image
    if query.reference_id is not None:
        data = catalog_image(version, query.reference_id, limits, "reference_id", 422)[0]
        try:
            image = decode(data, limits, "reference_id").image
        except ImageError as e:
            raise RequestError(422, field_message(e, "reference_id")) from e
    decoded = time.perf_counter()
    features = None
    try:
        if query.mode == "composed" and version.searcher.reranks(query.rerank_n):
            vector, features = runtime.embed_queries_with_features([image], [query.text])
        elif query.mode == "composed":
            vector = runtime.embed_queries([image], [query.text])
        elif query.mode == "image-only":
            vector = runtime.embed_images([image])
        else:
            vector = runtime.embed_texts([query.text])
    except InputError as e:  # a text with no tokens the tokenizer keeps
        raise RequestError(422, f"text: {e}") from e
    return Encoded(vector, allow, started, decoded, time.perf_counter(), features)


def response_json(version: Version, query: Query, encoded: Encoded, found: Found, metrics: ServiceMetrics) -> str:
    """The response's JSON, its stages observed in the metrics."""
    answered = response(version, query, encoded, found)
    for stage in ("decode", "encode", "search", "rerank"):
        took = getattr(answered.took_ms, stage)
        if took is not None:
            metrics.stages.labels(stage).observe(took / 1000)
    # Without None: a request that did not re-rank answers exactly as before there were re-rankers.
    return answered.model_dump_json(exclude_none=True)


def response(version: Version, query: Query, encoded: Encoded, found: Found) -> SearchResponse:
    uris = version.index.entries.uris_of(found.ids)
    done = time.perf_counter()
    hits = [Hit(id=str(i), score=float(s), uri=u, image=f"/items/{i}/image")
            for i, s, u in zip(found.ids, found.scores, uris)]
    searched = found.searched if found.reranked else done  # a re-ranked query's search ended before its re-rank
    ms = [round(1000 * t, 3) for t in (done - encoded.started, encoded.decoded - encoded.started,
                                       encoded.encoded - encoded.decoded, searched - encoded.encoded,
                                       done - searched)]
    rerank = {"rerank": ms[4]} if found.reranked else {}
    return SearchResponse(mode=query.mode, answers=ANSWERS[query.mode], results=hits, k=query.k,
                          bundle_id=version.bundle_id, index_id=version.index_id, catalog=version.catalog,
                          took_ms=Timing(total=ms[0], decode=ms[1], encode=ms[2], search=ms[3], **rerank),
                          partial=bool(found.missing), missing_shards=list(found.missing),
                          rerank_n=found.reranked or None)


def _allowed(version: Version, query: Query) -> np.ndarray | None:
    """The ids a result may have (allow_ids AND the filter, less the excluded), None for the whole catalog."""
    index = version.index
    for name, ids in (("reference_id", () if query.reference_id is None else (query.reference_id,)),
                      ("exclude_ids", query.exclude_ids), ("allow_ids", query.allow_ids or ())):
        unknown = index.entries.unknown_ids(np.asarray(ids, dtype=np.int64))
        if len(unknown):
            shown = ", ".join(str(i) for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            status = 404 if name == "reference_id" else 422
            raise RequestError(status, f"{name}: {len(unknown)} id(s) not in catalog {version.catalog} (index "
                                       f"{version.index_id}): {shown}")
    allow = None if query.allow_ids is None else np.unique(np.asarray(query.allow_ids, dtype=np.int64))
    if query.filter is not None:
        try:
            matching = index.entries.matching_ids(query.filter)
        except SearchError as e:  # an unknown field (its message lists the known ones) or a value of another type
            raise RequestError(422, f"filter: {e}") from e
        allow = matching if allow is None else np.intersect1d(allow, matching)
    if allow is not None and query.exclude_ids:
        allow = np.setdiff1d(allow, np.asarray(query.exclude_ids, dtype=np.int64))
    return allow


def _found(version: Version, encoded: Encoded, query: Query) -> Found:
    """The search of an index in this process (a GPU index's searches take turns: Version.search_lock)."""
    wanted = _wanted(version, encoded, query)
    with version.searching():
        try:
            ids, scores = version.index.search(encoded.vector, *_search_args(wanted, encoded.allow, query))
            missing: tuple[int, ...] = ()
        except PartialAnswer as partial:
            ids, scores, missing = partial.ids, partial.scores, partial.missing
        except ShardsUnavailableError as e:
            raise RequestError(503, str(e)) from e
    return _top(ids, scores, missing, query, encoded.allow, wanted)


async def _found_remote(version: Version, encoded: Encoded, query: Query) -> Found:
    """The search of a remote index (service/ray_shards.py), awaited on the event loop."""
    wanted = _wanted(version, encoded, query)
    try:
        ids, scores, missing = await version.index.search_async(encoded.vector,
                                                                *_search_args(wanted, encoded.allow, query))
    except ShardsUnavailableError as e:
        raise RequestError(503, str(e)) from e
    return _top(ids, scores, missing, query, encoded.allow, wanted)


def _wanted(version: Version, encoded: Encoded, query: Query) -> int:
    """Results the index stage keeps: k, or a re-ranked query's candidates."""
    return query.k if encoded.features is None else version.searcher.candidates(query.k, query.rerank_n)


def _search_args(wanted: int, allow: np.ndarray | None, query: Query) -> tuple[int, None, np.ndarray | None]:
    """(k, exclude_ids, allow_ids) for the index to find the `wanted` best: the exclusions are already out of an
    allowed set; without one, as many more are asked for and the excluded dropped after (_top)."""
    if allow is not None:
        return wanted, None, allow
    return wanted + len(query.exclude_ids), None, None


def _top(ids: np.ndarray, scores: np.ndarray, missing: tuple[int, ...], query: Query, allow: np.ndarray | None,
         wanted: int) -> Found:
    """The `wanted` best of one query's search, excluded ids left out and faiss's -1 padding dropped."""
    if allow is None and query.exclude_ids:
        ids, scores = drop_excluded(ids, scores, np.asarray([query.exclude_ids], dtype=np.int64), wanted)
    found = ids[0][:wanted] >= 0
    return Found(ids[0][:wanted][found], scores[0][:wanted][found], missing)


def _rerank(version: Version, encoded: Encoded, found: Found, query: Query) -> Found:
    """The re-rank stage of a query that re-ranks (the search library's rescore_candidates): its candidates
    scored exactly, the best k kept; any other query's search as it was."""
    if encoded.features is None:
        return found
    searched = time.perf_counter()
    ids, scores = rescore_candidates(version.index, version.searcher.runtime, encoded.features, found.ids[None],
                                     query.k)
    return Found(ids[0], scores[0], found.missing, len(found.ids), searched)


def catalog_image(version: Version, item_id: int, limits: ImageLimits, role: str, status: int) -> tuple[bytes, str]:
    """(bytes, content type) of a catalog item's image, re-checked: read through the gate (a regular file under
    the size cap) and still the bytes the snapshot embedded, so it is an image of the format recorded then,
    whatever its file name says or its path now points at. An index written before images were recorded has
    no sha256: its bytes must then be an image of an allowed format (of the recorded one, if any), sent as
    the type of the format they decode as. A failed check is a RequestError (`status`) naming the item in its
    `role` (the item asked for, or a query's reference)."""
    try:
        source = version.index.entries.source(item_id)
    except UnknownIdError as e:
        raise RequestError(404, str(e)) from e
    where = f"{role} {item_id}: its image at {source.uri!r}"
    try:
        data = read_bytes(source.uri, limits)
    except ImageError as e:
        raise RequestError(status, f"{where} is not served ({e})") from e
    except Exception as e:  # OSError, fsspec's own errors: the item exists but its image cannot be read here
        raise RequestError(status, f"{where} cannot be read by this service ({type(e).__name__}: {e})") from e
    if source.sha256 is not None:
        if hashlib.sha256(data).hexdigest() != source.sha256:
            raise RequestError(status, f"{where} changed since index {version.index_id} embedded it; it is served "
                                       "again once a refresh has embedded the new bytes")
        return data, mime_of(source.format)
    try:
        found = probe(data, limits, f"{role} {item_id}")
    except ImageError as e:
        raise RequestError(status, f"{where} is not served ({e})") from e
    if source.format is not None and found.format != source.format:
        raise RequestError(status, f"{where} is now {found.format}, not the {source.format} that was embedded")
    return data, found.mime


def _search_body_schema() -> dict[str, Any]:
    """POST /search reads its body itself (JSON or multipart on one path); this documents both in OpenAPI."""
    schema = SearchRequest.model_json_schema()
    form = {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary", "description": "the reference image file"},
        **{name: {"type": "string", "description": f"{prop.get('description', '')} (form field; lists as JSON "
                                                   "or comma-separated, filter as JSON)"}
           for name, prop in schema["properties"].items() if name != "image_base64"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                           "multipart/form-data": {"schema": form}}}}
