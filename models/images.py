"""The one gate every image passes before a model sees it: read under a byte cap, identify from an allow-list of
formats, refuse an oversized image from its header, decode the first frame and convert it honestly to RGB.

Catalogs and uploads hold hostile and broken files, and PIL's plugins raise whatever their parser trips on
(NotImplementedError, TypeError, struct.error, ...). Everything that goes wrong with the bytes ends here as an
ImageError naming the input and the reason: the embedding job records it as a bad image and goes on, the service
answers 400. Only the OSErrors of reading a file pass through read_file unchanged: whether a failed read is the
file's fault or the storage's (retry it) is the caller's decision.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from cirflow.core.config import check_positive

log = logging.getLogger(__name__)

DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # PIL's format names
OCTET_STREAM = "application/octet-stream"  # for an allowed format PIL knows no MIME type of (DDS, QOI, ...)
# PIL opens a JPEG with a multi-picture (MP) extension, as phone cameras write, as the format "MPO": a JPEG.
ALIASES = {"MPO": "JPEG"}
WHITE = (255, 255, 255)  # behind transparent pixels: a shop's product cut-out is shown on white
SNIFF_BYTES = 16  # the prefix Image.open hands the formats' magic-number checks
READ_CHUNK = 1 << 20  # reads after the first, when a file or stream returns less than asked
QUOTE_CHARS = 200  # of an exception's message quoted in a reason

# Formats PIL decodes by running another program on the bytes: never on untrusted input, whatever the config says.
UNSAFE = {"EPS": "PIL decodes it by running Ghostscript on the bytes"}
GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")  # modes with an alpha band (La and RGBa premultiplied)
# Modes whose colour PIL's own convert("RGB") gets right (CMYK naively, without an ICC profile, as browsers
# without colour management do).
DIRECT = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


class ImageError(ValueError):
    """An image cannot be read or decoded; the message names the input and the reason."""


class ImageTooLarge(ImageError):
    """Over a size limit (bytes or pixels): the input may be fine, only too big here (an HTTP 413, not a 422)."""



def decodable_formats() -> tuple[str, ...]:
    """The formats this PIL can open, sorted (registering every plugin, as Image.open does on a miss)."""
    Image.init()
    return tuple(sorted(Image.OPEN))


@dataclass(frozen=True)
class ImageLimits:
    # The encoded file, checked before reading (stat) and while reading: a 24 MP JPEG is about 10 MB, and a
    # hostile upload must not fill memory.
    max_bytes: int = 32 * 2**20
    # width x height from the header, before any pixel is decoded: above phone and shop cameras (12-24 MP), and
    # the decoded frame stays under 160 MB at 4 bytes a pixel. PIL's own process-wide limit (MAX_IMAGE_PIXELS,
    # 89 MP unless an application changed it; never set here) still applies where it is lower.
    max_pixels: int = 40_000_000
    # The allow-list, PIL's format names. Each format is a parser run on untrusted bytes: the default is the
    # formats web and shop images come in; rarer ones (DDS, PSD, IM, ...) only when a catalog needs them.
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        check_positive(self, "max_bytes", "max_pixels")
        if isinstance(self.formats, str):  # a lone "PNG" would be read as the formats P, N and G
            raise ValueError(f"formats={self.formats!r} must be a list of format names")
        names = tuple(dict.fromkeys(str(f).strip().upper() for f in self.formats))
        if not names:
            raise ValueError("formats must name at least one format")
        # The default formats are known to decode (a test holds them to it); asking PIL registers all of its
        # plugins, work that an import (of a default ImageLimits) must not do.
        if not set(names) <= set(DEFAULT_FORMATS):
            known = decodable_formats()
            unknown = [f for f in names if f not in known]
            if unknown:
                raise ValueError(f"formats {unknown} are not formats this PIL can decode; known: {', '.join(known)}")
        unsafe = [f"{f} ({UNSAFE[f]})" for f in names if f in UNSAFE]
        if unsafe:
            raise ValueError(f"formats {', '.join(unsafe)} cannot be allowed: untrusted bytes would reach it")
        object.__setattr__(self, "formats", names)


@dataclass(frozen=True)
class Probe:
    format: str  # PIL's name, one of the allow-list
    width: int
    height: int
    mime: str  # PIL's Image.MIME of the format, e.g. image/png


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # mode RGB, upright, the first frame of an animation or multi-page file
    format: str
    mime: str


def shown(name: str) -> str:
    """A name as a reason shows it: unprintable characters escaped (a file name may hold a newline or an escape
    sequence), so a name cannot forge a line of a log or of errors.parquet."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _quoted(value: object) -> str:
    """An exception's message or a value, escaped and cut short: PIL quotes header text and bytes in some."""
    text = shown(str(value))
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def _read_capped(read: Callable[[int], bytes | None], first: int, limit: int, label: str) -> bytes:
    """At most limit bytes from `read`; more is an ImageError. `first` is the size of the first read."""
    chunks: list[bytes] = []
    total, want = 0, first
    while total <= limit:
        chunk = read(min(want, limit + 1 - total))
        if chunk is None:  # a non-blocking stream with nothing ready: this gate does not wait for it
            raise ImageError(f"image {label}: the stream has no data ready (non-blocking)")
        if not chunk:
            break
        chunks.append(chunk)
        total, want = total + len(chunk), READ_CHUNK
    if total > limit:
        raise ImageTooLarge(f"image {label}: more than the limit of {limit} bytes")
    return b"".join(chunks)


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((text for test, text in kinds if test(mode)), f"file type {stat.S_IFMT(mode):#o}")


def open_regular(path: str | os.PathLike, label: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of a regular file, with its stat; the caller closes it. ImageError for a path no file
    can have and for anything but a regular file; the OSErrors of opening propagate unchanged."""
    # O_NONBLOCK: opening a FIFO without it waits for a writer, and one in a catalog would hang the job. Regular
    # files ignore the flag (POSIX), so reads behave as usual.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError as e:  # a NUL in the path: no file can have this name
        raise ImageError(f"image {label}: invalid path ({e})") from e
    try:
        info = os.fstat(fd)  # of what was opened: the path may have been swapped since any earlier stat
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"image {label}: not a regular file ({_kind(info.st_mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_file(path: str | os.PathLike, limits: ImageLimits, name: str | None = None) -> bytes:
    """A regular file's bytes, at most limits.max_bytes. ImageError for anything else; the OSErrors of opening and
    reading (not found, permission, EIO, ...) propagate unchanged for the caller to classify."""
    label = shown(name if name is not None else os.fsdecode(path))
    fd, info = open_regular(path, label)
    try:
        if info.st_size > limits.max_bytes:
            raise ImageTooLarge(f"image {label}: {info.st_size} bytes, over the limit of {limits.max_bytes}")
        # One read of the whole file; the extra byte tells a file that grew while read, which stays capped.
        return _read_capped(lambda n: os.read(fd, n), info.st_size + 1, limits.max_bytes, label)
    finally:
        os.close(fd)


def read_stream(stream: BinaryIO, limits: ImageLimits, name: str) -> bytes:
    """A file object's bytes (fsspec, an upload), at most limits.max_bytes; its read errors propagate."""
    return _read_capped(stream.read, limits.max_bytes + 1, limits.max_bytes, shown(name))


def _sniff(data: bytes) -> str | None:
    """The format whose magic number `data` starts with, by PIL's own checks (no parser runs), or None."""
    Image.init()
    prefix = data[:SNIFF_BYTES]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix):
                return ALIASES.get(fmt, fmt)
        except Exception:  # a check that trips on a short prefix recognises nothing
            continue
    return None


def _unidentified(data: bytes, limits: ImageLimits, label: str) -> str:
    """The reason for bytes that no allowed format's parser accepted."""
    fmt = _sniff(data)
    if fmt is None:
        return f"image {label}: cannot decode (not a recognised image format)"
    if fmt not in limits.formats:
        return f"image {label}: format {fmt} is not allowed (allowed: {', '.join(limits.formats)})"
    return f"image {label}: cannot decode (the signature of {fmt}, but a header PIL cannot read)"


def _check_header(img: Image.Image, limits: ImageLimits, label: str) -> Probe:
    fmt = ALIASES.get(img.format or "", img.format or "?")
    if fmt not in limits.formats:  # a plugin that answered with another format than the one asked for
        raise ImageError(f"image {label}: format {fmt} is not allowed (allowed: {', '.join(limits.formats)})")
    size = img.size
    if not (isinstance(size, tuple) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        raise ImageError(f"image {label}: invalid size {_quoted(size)} in the header")  # an IM header says anything
    width, height = size
    cap = limits.max_pixels
    if Image.MAX_IMAGE_PIXELS:  # read, never set: it is the whole process's
        cap = min(cap, int(Image.MAX_IMAGE_PIXELS))
    if width * height > cap:
        raise ImageTooLarge(f"image {label}: too large to decode ({width}x{height} = {width * height} pixels, over "
                         f"the limit of {cap})")
    return Probe(fmt, width, height, mime_of(fmt))


def mime_of(fmt: str | None) -> str:
    """The content type of a PIL format name (as the gate reports it); octet-stream when PIL knows none."""
    return Image.MIME.get(fmt or "", OCTET_STREAM)


@contextmanager
def _opened(data: bytes, limits: ImageLimits, label: str) -> Iterator[tuple[Image.Image, Probe]]:
    """The image opened from its header, no pixel decoded yet, and its Probe. Every exception raised here or in
    the caller's block becomes an ImageError: callers must never see another type from decoding."""
    if not data:
        raise ImageError(f"image {label}: empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image {label}: {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, and would decode: an error instead, with
            # PIL's reason. catch_warnings changes the process's filters while it lasts (not thread-safe), so it
            # spans the open alone, and the pixel cap in _check_header, which refuses these too, does not depend
            # on it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=limits.formats)
        with img:
            yield img, _check_header(img, limits, label)
    except ImageError:
        raise
    except UnidentifiedImageError as e:  # its message holds the BytesIO's repr (an address): not stable
        raise ImageError(_unidentified(data, limits, label)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # from the header, no pixels
        raise ImageTooLarge(f"image {label}: too large to decode ({_quoted(e)})") from e
    except Exception as e:  # NotImplementedError, TypeError, struct.error, MemoryError, RecursionError, ...
        raise ImageError(f"image {label}: cannot decode ({type(e).__name__}: {_quoted(e)})") from e


def probe(data: bytes, limits: ImageLimits, name: str) -> Probe:
    """Format, size and MIME type from the header alone; ImageError if the image is not allowed or too large."""
    with _opened(data, limits, shown(name)) as (_, found):
        return found


def decode(data: bytes, limits: ImageLimits, name: str) -> Decoded:
    """probe, then decode the first frame (an animation's, a multi-page TIFF's) to an upright RGB image."""
    with _opened(data, limits, shown(name)) as (img, found):
        img.load()  # Image.open leaves a multi-frame image on frame 0
        return Decoded(to_rgb(img, name=name), found.format, found.mime)


def to_rgb(image: Image.Image, *, name: str = "<image>") -> Image.Image:
    """Any mode PIL produces -> a new RGB image, turned upright by its EXIF orientation, transparent pixels over
    white. ImageError, naming the image by `name`, for a mode with no honest conversion."""
    out = _upright(image)
    if out.mode in GRAY16 or out.mode in ("I", "F"):
        out = _gray_to_8bit(out)
    if out.mode == "La":
        out = out.convert("LA")  # un-premultiplied; PIL has no La -> RGBA
    if out.mode in ALPHA or out.mode == "P" or "transparency" in out.info:
        if out.mode not in ALPHA + DIRECT:
            raise ImageError(f"image {shown(name)}: mode {_quoted(out.mode)} cannot be converted to RGB")
        # P: a palette may carry alpha without a transparency key; opaque pixels come through unchanged.
        rgba = out.convert("RGBA")
        flat = Image.new("RGB", out.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))  # colour x alpha + white x (1 - alpha)
        return flat
    if out.mode == "RGB":
        return out.copy() if out is image else out  # never the caller's object: decode closes its file
    if out.mode not in DIRECT:
        raise ImageError(f"image {shown(name)}: mode {_quoted(out.mode)} cannot be converted to RGB")
    return out.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: a phone stores a portrait photo sideways with an EXIF orientation."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
            return image  # exif_transpose would copy the pixels for nothing
        return ImageOps.exif_transpose(image)
    except Exception as e:
        # The orientation is a display hint: a malformed EXIF block must not cost a photo whose pixels decode.
        log.debug("EXIF orientation unreadable (%s: %s); the image is kept as stored", type(e).__name__, e)
        return image


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey -> L (LA where the image marks one value transparent). PIL's own
    convert clips these to 0..255, which turns a 16-bit photo white."""
    values = np.asarray(image)  # (H, W) uint16, int32 or float32
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        # Float TIFFs (scientific and HDR exports) hold 0..1, while PIL's own conversions to F keep 0..255: an
        # image whose every value lies in [0, 1] is read as the first, any other as the second, clipped.
        scale = 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 1.0
        gray = np.rint(np.clip(values * scale, 0.0, 255.0)).astype(np.uint8)
    else:
        # 0..65535 to 0..255, rounded. Mode I is how PIL reads some 16-bit and all 32-bit integer images: read as
        # 16-bit, values beyond 0..65535 clipped to it (a 32-bit image's scale is anyone's guess).
        wide = np.clip(values, 0, 65535).astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        gray = wide.astype(np.uint8)
    out = Image.fromarray(gray)
    key = image.info.get("transparency")
    if isinstance(key, int) and image.mode != "F":  # a 16-bit PNG's tRNS: the grey value that is transparent
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
        return Image.merge("LA", (out, alpha))
    return out


def load_image(source: Path | bytes, name: str | None = None, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """A file path or encoded bytes -> an RGB PIL image, or ImageError naming the input, read errors included."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode(bytes(source), limits, name or "<bytes>").image
    label = name or str(source)
    try:
        data = read_file(source, limits, label)
    except FileNotFoundError as e:
        raise ImageError(f"image {shown(label)}: file not found") from e
    except OSError as e:  # the path's own message holds the name again, quoted differently
        raise ImageError(f"image {shown(label)}: cannot read ({_quoted(e.strerror or e)})") from e
    return decode(data, limits, label).image
