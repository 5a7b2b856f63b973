"""The search service's request and response bodies, and the checks that turn bad requests into clear 4xx.

POST /search takes JSON (`image_base64`) or multipart/form-data (an `image` file upload; the other fields as
form fields, lists as JSON or comma-separated). Both become one `SearchRequest`, then one `Query` once the
limits of the running service are applied. Catalog ids are 63-bit: responses carry them as decimal strings (a
JavaScript number loses digits past 2**53) and requests accept either form.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from cirflow.indexing.service.state import ServiceConfig
from cirflow.models.images import ImageError, ImageTooLarge, decode

Mode = Literal["composed", "image-only", "text-only"]
# What each mode ranks the catalog by: said in every response, so a client never mistakes one for another.
ANSWERS = {
    "composed": "catalog images matching the reference image as changed by the text (the model's composed query)",
    "image-only": "catalog images most similar to the reference image (its catalog vector; the text is absent)",
    "text-only": "catalog images closest to the text's vector alone (the model's text-only baseline: it was "
                 "trained for composed queries, so expect weaker results than a composed query)",
}
MAX_ID = 2**63 - 1
_DECIMAL = re.compile(r"-?\d{1,20}")


class RequestError(ValueError):
    """A bad request: `status` (400, 404, 413, 415, 422) and a message naming the field and what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _catalog_id(value: Any) -> Any:
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a catalog id is an integer or a decimal string, got {value!r}")
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"catalog ids lie in 0..2**63-1, got {value}")
    return value


def _count(value: Any) -> Any:
    """An integer or a decimal string (a form field); never a bool or a float (pydantic's lax mode would take
    `true` as 1 and 2.0 as 2)."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


CatalogId = Annotated[int, BeforeValidator(_catalog_id)]
Count = Annotated[int, BeforeValidator(_count)]
Scalar = str | int | float | bool


class SearchRequest(BaseModel):
    """A composed (image + text), image-only or text-only query. The image is `image_base64`, an uploaded file
    (multipart field `image`) or a catalog item (`reference_id`)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="the modification text (or the whole query, text-only)")
    image_base64: str | None = Field(None, description="the reference image's encoded bytes, base64")
    reference_id: CatalogId | None = Field(None, description="a catalog item whose image is the reference")
    k: Count = Field(10, description="how many results (1..max_k; see GET /api/info)")
    exclude_ids: list[CatalogId] = Field(default_factory=list, description="catalog ids never returned")
    allow_ids: list[CatalogId] | None = Field(None, description="only these catalog ids may be returned")
    filter: dict[str, Scalar | list[Scalar]] | None = Field(
        None, description="metadata filter: field -> value or list of values (any of them); fields AND together")
    exclude_reference: StrictBool = Field(True, description="leave the reference_id item out of its own results")
    rerank_n: Count | None = Field(
        None, description="composed queries of a model with a re-ranker (GET /api/info): the index's candidates "
                          "re-scored exactly (0: none; default: the model's); ignored by models without one")


class Hit(BaseModel):
    id: str = Field(description="catalog id (decimal string: 63-bit)")
    score: float = Field(description="cosine similarity to the query")
    uri: str
    image: str = Field(description="path of GET /items/{id}/image")


class Timing(BaseModel):
    total: float
    decode: float  # the request checks, with an upload's base64 and image gate, or a catalog image read and checked
    encode: float
    search: float
    rerank: float | None = None  # the re-rank stage, where the request re-ranked (absent otherwise)


class SearchResponse(BaseModel):
    mode: Mode
    answers: str = Field(description="what this mode ranks the catalog by")
    results: list[Hit]
    k: int
    bundle_id: str
    index_id: str
    catalog: str
    took_ms: Timing
    partial: bool = Field(False, description="some index shards did not answer in time: results are the best of "
                                             "the others")
    missing_shards: list[int] = Field(default_factory=list, description="the shards missing from a partial answer")
    rerank_n: int | None = Field(None, description="candidates re-scored exactly by the model's re-ranker (present "
                                                   "only where the request re-ranked)")


@dataclass(frozen=True)
class Query:
    """A checked request: what to encode and how to search."""

    mode: Mode
    text: str | None
    image: Image.Image | None  # the upload, decoded (RGB, upright); None when reference_id names the image
    reference_id: int | None
    k: int
    exclude_ids: tuple[int, ...]
    allow_ids: tuple[int, ...] | None
    filter: dict[str, list[Any]] | None
    rerank_n: int | None = None  # as SearchRequest's


def validation_message(error: ValidationError) -> str:
    """pydantic's errors as one line a person can act on: `field: problem; ...`."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" + (" (not a field of this request)" if item["type"] == "extra_forbidden"
                                               else ""))
    return "; ".join(parts)


def parse_json(body: bytes) -> SearchRequest:
    if not body.strip():
        raise RequestError(400, "the request body is empty; send a JSON object (see GET /docs)")
    try:
        return SearchRequest.model_validate_json(body)
    except ValidationError as e:
        if any(item["type"] == "json_invalid" for item in e.errors()):
            raise RequestError(400, f"the request body is not valid JSON: {e.errors()[0]['msg']}") from e
        raise RequestError(422, validation_message(e)) from e


def parse_form(fields: dict[str, str], upload: bytes | None) -> tuple[SearchRequest, bytes | None]:
    """Multipart fields (strings) and the uploaded `image` file's bytes."""
    data: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("exclude_ids", "allow_ids"):
            data[name] = _form_list(name, value)
        elif name == "filter":
            data[name] = _form_json(name, value)
        elif name == "exclude_reference":
            data[name] = _form_bool(name, value)
        else:
            data[name] = value
    try:
        return SearchRequest.model_validate(data), upload
    except ValidationError as e:
        raise RequestError(422, validation_message(e)) from e


def _form_list(name: str, value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        parsed = _form_json(name, value)
        if not isinstance(parsed, list):
            raise RequestError(422, f"{name}: expected a JSON list or comma-separated ids")
        return parsed
    return [part for part in (p.strip() for p in value.split(",")) if part]


def _form_bool(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise RequestError(422, f"{name}: expected true or false, got {value!r}")


def _form_json(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RequestError(422, f"{name}: not valid JSON ({e.msg} at character {e.pos})") from e


def check(request: SearchRequest, upload: bytes | None, config: ServiceConfig) -> Query:
    """The request against the service's limits; raises RequestError naming the field."""
    image = upload
    if request.image_base64 is not None:
        if upload is not None:
            raise RequestError(422, "give the reference image once: an uploaded file or image_base64, not both")
        image = _base64(request.image_base64)
    if image is not None and request.reference_id is not None:
        raise RequestError(422, "give the reference image once: reference_id or an image, not both")
    if image is not None:
        if not image:
            raise RequestError(422, "image: the uploaded image is empty (0 bytes)")
    picture = None if image is None else decode_upload(image, config)
    text = request.text
    if text is not None:
        if not text.strip():
            raise RequestError(422, "text: empty; give the modification in words, or leave text out for an "
                                    "image-only query")
        if len(text) > config.max_text_chars:
            raise RequestError(422, f"text: {len(text)} characters, over this service's limit of "
                                    f"{config.max_text_chars}")
    has_image = image is not None or request.reference_id is not None
    if not has_image and text is None:
        raise RequestError(422, "no query: give a reference image (an uploaded `image`, `image_base64` or "
                                "`reference_id`), a `text`, or both")
    mode: Mode = "composed" if has_image and text is not None else "image-only" if has_image else "text-only"
    if not 1 <= request.k <= config.max_k:
        raise RequestError(422, f"k: must be between 1 and {config.max_k}, got {request.k}")
    if request.rerank_n is not None and not 0 <= request.rerank_n <= config.max_rerank_n:
        raise RequestError(422, f"rerank_n: must be between 0 and {config.max_rerank_n}, got {request.rerank_n}")
    for name in ("exclude_ids", "allow_ids"):
        ids = getattr(request, name)
        if ids is not None and len(ids) > config.max_ids:
            raise RequestError(422, f"{name}: {len(ids)} ids, over this service's limit of {config.max_ids}")
    excluded = set(request.exclude_ids)
    if request.reference_id is not None and request.exclude_reference:
        excluded.add(request.reference_id)
    filters = None if request.filter is None else {
        field: value if isinstance(value, list) else [value] for field, value in request.filter.items()}
    return Query(mode, text, picture, request.reference_id, request.k, tuple(sorted(excluded)),
                 None if request.allow_ids is None else tuple(request.allow_ids), filters, request.rerank_n)


def _base64(value: str) -> bytes:
    if value.startswith("data:") and "," in value:  # a data URL, as a browser's FileReader gives it
        value = value.split(",", 1)[1]
    # MIME base64 (`base64` the tool, email, PEM) wraps lines at 76 characters: the line breaks are no data.
    value = "".join(value.split())
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(422, f"image_base64: not valid base64 ({e})") from e


def decode_upload(data: bytes, config: ServiceConfig) -> Image.Image:
    """The uploaded image through the image gate, decoded once, here: refused from its header alone when it is no
    image of an allowed format or over the pixel limit (a decompression bomb costs a few bytes to send and
    gigabytes to decode), and when its pixels do not decode."""
    try:
        return decode(data, config.images, "image").image
    except ImageTooLarge as e:
        raise RequestError(413, f"{field_message(e, 'image')}; send a smaller image") from e
    except ImageError as e:
        raise RequestError(422, field_message(e, "image")) from e


def field_message(error: ImageError, field: str) -> str:
    """The image gate's `image <name>: reason` for a request field decoded under the name `field`, as
    `field: reason` (the request errors' form)."""
    return f"{field}: {str(error).removeprefix(f'image {field}: ')}"
