"""Fuzzing the image gate (models/images.py): mutated images through `decode`, counting what decodes, what is
refused with an ImageError, and anything else (a crash: the gate let an exception of another type through, or
returned an image that breaks its contract: not RGB, over the pixel cap, a format off the allow-list).

    .venv/bin/python bench/fuzz_images.py [--seconds 300] [--seed 0] [--formats JPEG,PNG,...] [--out DIR]
        [--doc docs/benchmarks.md]

Seeds: small valid images (16x16 to 32x32) of every allowed format in the modes a catalog holds: RGB, grey,
palette with transparency, 16-bit grey, CMYK, alpha, animated GIF/WEBP/APNG, multi-page and float TIFF, an
EXIF-rotated JPEG. Each input after the seeds is a seed (formats taken in turn, so each gets its share) changed by
one to three seeded mutations: bit flips, bytes overwritten with 0x00/0xff/0x7f/0x80, 16/32-bit boundary integers
written into the first bytes of the header, truncation, a slice or PNG chunk duplicated, random bytes inserted,
two seeds spliced, junk or HTML appended, and the dimension fields of the format's header set to huge (or zero)
values. PNG mutants get their chunk CRCs recomputed three times in four, or nearly all would stop at the first
CRC check. Inputs are named like "PNG-16bit-flip+int-1234" (seed, mutations, index): the same --seed makes the
same inputs, in the same order.

Results: DIR/result.json (counts per format, the slowest input, every crash with its name, type and message),
one file per crash reproducer under DIR/crashes/, and the "fuzz_images" section of --doc. The run exits 1 when
it found a crash. A single process, one core: inputs per second is per core. libtiff and libjpeg print a line on
the C stderr for most broken inputs: it goes to /dev/null during the run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import resource
import shlex
import struct
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features
from report import DOC, machine, today, write_section

from cirflow.core.files import write_bytes_atomic, write_json_atomic
from cirflow.models.images import DEFAULT_FORMATS, ImageError, ImageLimits, decode

INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
BOUNDARY_INTS = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                 0xFFFFFFFF)
HUGE_SIDES = (0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)
HTML = b"<!doctype html><html><head><title>404</title></head><body>Not Found</body></html>\n"
HEADER_BYTES = 64  # where the integer writes land: the fields every format keeps first
KEEP_CRASHES = 100  # reproducers kept in memory and written; the count goes on past it
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- seeds ----------------------------------------------------------------------------------------------------

def picture(size: tuple[int, int] = (24, 24), mode: str = "RGB") -> Image.Image:
    """A deterministic picture with edges and gradients (compressors and filters get real work), in `mode`."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x ^ y) * 16 % 256], axis=-1)
    rgb[h // 4:h // 2, w // 4:w // 2] = (250, 30, 30)  # a red square
    image = Image.fromarray(rgb.astype(np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _frames(n: int = 3) -> list[Image.Image]:
    return [Image.new("RGB", (20, 20), colour) for colour in [(250, 30, 30), (30, 30, 250), (30, 250, 30)][:n]]


def _gray16() -> Image.Image:
    return Image.fromarray((np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 113).astype(np.uint16))


def _palette_with_transparency() -> Image.Image:
    image = picture((24, 24), "RGB").quantize(16)
    image.info["transparency"] = 0
    return image


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    return _encode(picture((32, 16)), "JPEG", exif=exif.tobytes())


def _multipage_tiff() -> bytes:
    first, *rest = _frames()
    return _encode(first, "TIFF", save_all=True, append_images=rest)


def _float_tiff() -> bytes:
    return _encode(Image.fromarray(np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16), "F"), "TIFF")


SEEDS: dict[str, list[tuple[str, Callable[[], bytes]]]] = {
    "JPEG": [("rgb", lambda: _encode(picture(), "JPEG", quality=90)),
             ("gray", lambda: _encode(picture(mode="L"), "JPEG")),
             ("cmyk", lambda: _encode(picture(mode="CMYK"), "JPEG")),
             ("progressive", lambda: _encode(picture((32, 32)), "JPEG", progressive=True)),
             ("exif-rotated", _rotated_jpeg)],
    "PNG": [("rgb", lambda: _encode(picture(), "PNG")),
            ("rgba", lambda: _encode(picture(mode="RGBA"), "PNG")),
            ("16bit", lambda: _encode(_gray16(), "PNG")),
            ("palette-trns", lambda: _encode(_palette_with_transparency(), "PNG")),
            ("la", lambda: _encode(picture(mode="LA"), "PNG")),
            ("1bit", lambda: _encode(picture(mode="1"), "PNG")),
            ("apng", lambda: _encode(_frames()[0], "PNG", save_all=True, append_images=_frames()[1:]))],
    "WEBP": [("lossy", lambda: _encode(picture(), "WEBP", quality=80)),
             ("lossless-rgba", lambda: _encode(picture(mode="RGBA"), "WEBP", lossless=True)),
             ("anim", lambda: _encode(_frames()[0], "WEBP", save_all=True, append_images=_frames()[1:]))],
    "GIF": [("anim", lambda: _encode(_frames()[0], "GIF", save_all=True, append_images=_frames()[1:],
                                     duration=50, loop=0)),
            ("trns", lambda: _encode(_palette_with_transparency(), "GIF")),
            ("gray", lambda: _encode(picture(mode="L"), "GIF"))],
    "BMP": [("rgb", lambda: _encode(picture(), "BMP")),
            ("palette", lambda: _encode(picture().quantize(16), "BMP")),
            ("1bit", lambda: _encode(picture(mode="1"), "BMP")),
            ("rgba", lambda: _encode(picture(mode="RGBA"), "BMP"))],
    "TIFF": [("rgb", lambda: _encode(picture(), "TIFF")),
             ("16bit", lambda: _encode(_gray16(), "TIFF")),
             ("cmyk", lambda: _encode(picture(mode="CMYK"), "TIFF")),
             ("multipage", _multipage_tiff),
             ("float", _float_tiff),
             ("deflate", lambda: _encode(picture(), "TIFF", compression="tiff_deflate")),
             ("lzw", lambda: _encode(picture(mode="RGBA"), "TIFF", compression="tiff_lzw")),
             ("jpeg", lambda: _encode(picture((32, 32)), "TIFF", compression="jpeg"))],
}


def seeds(formats: tuple[str, ...]) -> dict[str, bytes]:
    """Small valid images of each format, named "FORMAT-label". A format without seeds of its own gets an RGB
    (or grey) picture where PIL can write the format, none where it cannot."""
    out: dict[str, bytes] = {}
    for fmt in formats:
        makers = SEEDS.get(fmt) or [("rgb", lambda f=fmt: _encode(picture(), f)),
                                    ("gray", lambda f=fmt: _encode(picture(mode="L"), f))]
        for label, make in makers:
            try:
                out[f"{fmt}-{label}"] = make()
            except (OSError, ValueError, KeyError):  # PIL cannot write this format (or this mode of it)
                continue
    return out


# --- mutations --------------------------------------------------------------------------------------------------

def _flip(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        i = _offset(rng, data)
        data[i] ^= 1 << rng.randrange(8)
    return data


def _bytes(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        data[_offset(rng, data)] = rng.choice(INTERESTING_BYTES)
    return data


def _int(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    width, order = rng.choice([(2, "<"), (2, ">"), (4, "<"), (4, ">")])
    value = rng.choice(BOUNDARY_INTS) & (0xFFFF if width == 2 else 0xFFFFFFFF)
    i = rng.randrange(max(1, min(len(data), HEADER_BYTES) - width + 1))
    data[i:i + width] = struct.pack(order + ("H" if width == 2 else "I"), value)
    return data


def _truncate(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    cut = rng.randint(1, min(len(data), HEADER_BYTES)) if rng.random() < 0.5 else rng.randrange(1, len(data) + 1)
    return data[:cut]


def _duplicate(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    chunks = _png_chunks(data)
    if chunks and rng.random() < 0.7:
        start, end = rng.choice(chunks)
        return data[:end] + data[start:end] + data[end:]
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 256))
    at = rng.randrange(len(data) + 1)
    return data[:at] + data[start:end] + data[at:]


def _insert(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    at = _offset(rng, data)
    return data[:at] + bytearray(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) + data[at:]


def _splice(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    other = rng.choice(bases)
    return data[:rng.randrange(1, len(data) + 1)] + other[rng.randrange(len(other)):]


def _junk(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    tail = rng.choice([HTML, rng.choice(bases), bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512)))])
    return data + tail


def _huge(rng: random.Random, data: bytearray, bases: list[bytes]) -> bytearray:
    fields = _dimension_fields(bytes(data))
    if not fields:
        return _int(rng, data, bases)
    for offset, width, order in rng.sample(fields, rng.randint(1, len(fields))):
        value = rng.choice(HUGE_SIDES) & ((1 << (8 * width)) - 1)
        data[offset:offset + width] = value.to_bytes(width, "little" if order == "<" else "big")
    return data


MUTATIONS: dict[str, Callable[[random.Random, bytearray, list[bytes]], bytearray]] = {
    "flip": _flip, "byte": _bytes, "int": _int, "truncate": _truncate, "dup": _duplicate, "insert": _insert,
    "splice": _splice, "junk": _junk, "huge": _huge}


def _offset(rng: random.Random, data: bytearray) -> int:
    """A position to change, the header (the first 256 bytes) half the time: most parsing happens there."""
    return rng.randrange(min(len(data), 256) if rng.random() < 0.5 else len(data))


def _png_chunks(data: bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) of each whole chunk of a PNG, length and CRC included; [] for anything else."""
    if not data.startswith(PNG_MAGIC):
        return []
    chunks, at = [], len(PNG_MAGIC)
    while at + 12 <= len(data):
        end = at + 12 + int.from_bytes(data[at:at + 4], "big")
        if end > len(data):
            break
        chunks.append((at, end))
        at = end
    return chunks


def _fix_png_crcs(data: bytearray) -> bytearray:
    for start, end in _png_chunks(data):
        data[end - 4:end] = struct.pack(">I", zlib.crc32(bytes(data[start + 4:end - 4])))
    return data


def _dimension_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width in bytes, byte order) of the width and height fields in this format's header."""
    if data.startswith(PNG_MAGIC):
        return [(16, 4, ">"), (20, 4, ">")]
    if data[:6] in (b"GIF87a", b"GIF89a"):
        fields = [(6, 2, "<"), (8, 2, "<")]
        descriptor = data.find(b"\x2c", 13)  # the first image descriptor, most likely
        return fields + ([(descriptor + 5, 2, "<"), (descriptor + 7, 2, "<")] if descriptor > 0 else [])
    if data[:2] == b"BM":
        return [(18, 4, "<"), (22, 4, "<")]
    if data[:2] == b"\xff\xd8":
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0:
                return [(at + 5, 2, ">"), (at + 7, 2, ">")]
        return []
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        if data[12:16] == b"VP8X":
            return [(24, 3, "<"), (27, 3, "<")]
        if data[12:16] == b"VP8 ":
            return [(26, 2, "<"), (28, 2, "<")]  # 14 bits each (the top 2 bits are a scale)
        return [(21, 4, "<")]  # VP8L: width - 1 and height - 1, 14 bits each, packed together
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_dimension_fields(data)
    return []


def _tiff_dimension_fields(data: bytes) -> list[tuple[int, int, str]]:
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        fields = []
        for k in range(count):
            tag, kind = struct.unpack_from(order + "HH", data, ifd + 2 + 12 * k)
            if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4), stored inline
                fields.append((ifd + 2 + 12 * k + 8, 2 if kind == 3 else 4, order))
        return fields
    except struct.error:
        return []


def mutations(seed: int, bases: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    """An endless, seeded stream of (name, mutated bytes); the formats of `bases` take turns."""
    rng = random.Random(seed)
    by_format: dict[str, list[str]] = {}
    for name in bases:
        by_format.setdefault(name.split("-", 1)[0], []).append(name)
    formats, pool = sorted(by_format), list(bases.values())
    for i in itertools.count():
        base = rng.choice(by_format[formats[i % len(formats)]])
        kinds = rng.sample(sorted(MUTATIONS), rng.randint(1, 3))
        data = bytearray(bases[base])
        for kind in kinds:
            data = MUTATIONS[kind](rng, data, pool) or bytearray(b"\x00")
        if data.startswith(PNG_MAGIC) and rng.random() < 0.75:
            data = _fix_png_crcs(data)
        yield f"{base}-{'+'.join(kinds)}-{i}", bytes(data)


# --- the run ------------------------------------------------------------------------------------------------------

def refusal(message: str) -> str:
    """An ImageError's reason without the input's name, cut to its kind: "cannot decode (OSError)", ..."""
    reason = message.split(": ", 1)[-1]
    if reason.startswith("cannot decode (") and ":" in reason:
        return reason.split(":", 1)[0] + ")"
    return reason.split(" (", 1)[0] if not reason.startswith("cannot decode") else reason


def run(budget_seconds: float, seed: int, limits: ImageLimits, max_inputs: int | None = None) -> dict[str, Any]:
    """Feed the seeds, then their mutants, through decode until the time budget (or max_inputs) is spent."""
    bases = seeds(limits.formats)
    counts = {fmt: Counter() for fmt in sorted({name.split("-", 1)[0] for name in bases})}
    refusals: Counter[str] = Counter()
    crashes: list[dict[str, Any]] = []
    slowest = {"name": None, "seconds": 0.0}
    tried, started = 0, time.monotonic()
    stream = itertools.chain(bases.items(), mutations(seed, bases))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about half the mutants (corrupt EXIF, truncated data)
        for name, data in stream:
            if (max_inputs is not None and tried >= max_inputs) or time.monotonic() - started >= budget_seconds:
                break
            tried += 1
            fmt = name.split("-", 1)[0]
            counts[fmt]["tried"] += 1
            began = time.perf_counter()
            crash: dict[str, Any] | None = None
            try:
                out = decode(data, limits, name)
                w, h = out.image.size
                if out.image.mode != "RGB" or w * h > limits.max_pixels or out.format not in limits.formats:
                    crash = {"type": "ContractViolation", "message": f"mode {out.image.mode}, {w}x{h}, {out.format}"}
                else:
                    counts[fmt]["decoded"] += 1
            except ImageError as e:
                counts[fmt]["image_errors"] += 1
                refusals[refusal(str(e))] += 1
            except Exception as e:  # what the gate exists to stop: anything but ImageError
                crash = {"type": type(e).__name__, "message": str(e)[:300]}
            seconds = time.perf_counter() - began
            if seconds > slowest["seconds"]:
                slowest = {"name": name, "seconds": seconds}
            if crash is not None:
                counts[fmt]["crashes"] += 1
                if len(crashes) < KEEP_CRASHES:
                    crashes.append({"name": name, **crash, "data": data})
    elapsed = time.monotonic() - started
    total = sum(counts.values(), Counter())
    return {"seed": seed, "seeds": sorted(bases), "limits": {"max_bytes": limits.max_bytes,
                                                             "max_pixels": limits.max_pixels,
                                                             "formats": list(limits.formats)},
            "tried": tried, "decoded": total["decoded"], "image_errors": total["image_errors"],
            "crashes": total["crashes"], "seconds": elapsed, "per_second": tried / elapsed if elapsed else 0.0,
            "slowest": slowest, "formats": {fmt: dict(c) for fmt, c in counts.items()},
            "refusals": dict(refusals.most_common()), "crash_list": crashes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --- the command ----------------------------------------------------------------------------------------------

def save_crashes(result: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Write each kept crash's input to out/crashes/NAME.bin; the crash records, with the file, for JSON."""
    records = []
    for crash in result["crash_list"]:
        path = out / "crashes" / f"{crash['name']}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, crash["data"])
        records.append({k: v for k, v in crash.items() if k != "data"} | {"file": str(path)})
    return records


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """The C stderr to /dev/null: libtiff and libjpeg print a line for most broken inputs, thousands a second."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def render(result: dict[str, Any], command: str) -> str:
    limits = result["limits"]
    libs = ", ".join(f"{name} {features.version(feature)}" for name, feature in
                     [("libjpeg", "jpg"), ("zlib", "zlib"), ("libtiff", "libtiff"), ("libwebp", "webp")])
    lines = ["## Image gate fuzzing (models/images.py `decode`)", "",
             f"- date: {today()}; machine: {machine()}; Pillow {Image.__version__} ({libs})",
             f"- command: `{command}`",
             f"- {len(result['seeds'])} seed images ({', '.join(result['seeds'])}), then seeded mutants of them "
             f"(seed {result['seed']}); limits: {limits['max_bytes']} bytes, {limits['max_pixels']:,} pixels, "
             f"formats {', '.join(limits['formats'])}; method: the docstring of bench/fuzz_images.py",
             f"- one process on one core: **{result['tried']:,} inputs in {result['seconds']:.0f} s, "
             f"{result['per_second']:.0f} per second**; slowest input {result['slowest']['name']} "
             f"({result['slowest']['seconds'] * 1000:.1f} ms); peak RSS {result['peak_rss_mib']:.0f} MiB", "",
             "| format | inputs | decoded | ImageError | crashes |", "|---|---|---|---|---|"]
    for fmt, c in result["formats"].items():
        lines.append(f"| {fmt} | {c.get('tried', 0):,} | {c.get('decoded', 0):,} | {c.get('image_errors', 0):,} | "
                     f"{c.get('crashes', 0)} |")
    lines += [f"| **all** | {result['tried']:,} | {result['decoded']:,} | {result['image_errors']:,} | "
              f"{result['crashes']} |", ""]
    top = list(result["refusals"].items())[:8]
    lines.append("Most frequent refusals: " + "; ".join(f"{reason} {n:,}" for reason, n in top) + ".")
    if result["crashes"]:
        lines.append(f"\n**Crashes: {result['crashes']}** (reproducers under the run's --out folder):")
        lines += [f"- {c['name']}: {c['type']}: {c['message']}" for c in result["crash_list"][:20]]
    else:
        lines.append("\nCrashes (any exception but ImageError, or an image off the contract): **none**.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations (default 0)")
    parser.add_argument("--formats", help=f"comma-separated allow-list (default {','.join(DEFAULT_FORMATS)})")
    parser.add_argument("--out", type=Path, default=Path("workdir/bench/fuzz-images"),
                        help="result.json and crashes/ (default workdir/bench/fuzz-images)")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file of the section (default "
                        "docs/benchmarks.md; a smoke run passes another)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        raise SystemExit(f"--seconds must be positive, got {args.seconds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/fuzz_images.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        limits = ImageLimits(formats=tuple(args.formats.split(","))) if args.formats else ImageLimits()
    except ValueError as e:
        raise SystemExit(f"--formats: {e}") from e
    with quiet_stderr():
        result = run(args.seconds, args.seed, limits)
    crashes = save_crashes(result, args.out)
    write_json_atomic(args.out / "result.json", {k: v for k, v in result.items() if k != "crash_list"}
                      | {"crash_list": crashes})
    body = render(result, command)
    write_section("fuzz_images", body, args.doc)
    print(body)
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
