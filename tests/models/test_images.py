"""The image gate (models/images.py): hostile inputs end as ImageError, files are capped before reading, the
allow-list holds, and every mode PIL produces becomes the RGB a person would see."""

from __future__ import annotations

import io
import os
import struct
import threading
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cirflow.models import images
from cirflow.models.images import (
    DEFAULT_FORMATS,
    ImageError,
    ImageLimits,
    decodable_formats,
    decode,
    load_image,
    probe,
    read_file,
    read_stream,
    to_rgb,
)
from cirflow.models.preprocess import ImageError as PreprocessImageError
from cirflow.models.preprocess import load_image as preprocess_load_image

RED, BLUE, WHITE = (250, 30, 30), (30, 30, 250), (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) and whose data holds no pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def dds_pixel_format_0() -> bytes:
    """300 bytes: "DDS ", a 124-byte header of a 4x4 texture whose pixel format flags are 0 (none of RGB,
    luminance, palette, FourCC): PIL's DDS plugin raises NotImplementedError for it."""
    header = struct.pack("<I", 124) + struct.pack("<3I", 0x1007, 4, 4) + bytes(108)
    data = b"DDS " + header
    return data + bytes(300 - len(data))


# An IM header whose size field parses to floats: PIL opens it and then raises TypeError while loading.
IM_TYPE_ERROR = b"Image type: L image\r\nName: x\r\nImage size (x*y): 1.5*1\r\n\x1a" + bytes(16)


def test_the_old_crashers_end_as_image_errors() -> None:
    """Before the gate, load_image let NotImplementedError (DDS) and TypeError (IM) through to its callers."""
    dds = dds_pixel_format_0()
    with pytest.raises(ImageError, match=r"^image x\.dds: format DDS is not allowed \(allowed: JPEG, PNG, WEBP, "
                                         r"GIF, BMP, TIFF\)$"):
        decode(dds, ImageLimits(), "x.dds")
    with pytest.raises(ImageError, match=r"^image x\.dds: cannot decode \(NotImplementedError: Unknown pixel "
                                         r"format flags 0\)$"):
        decode(dds, ImageLimits(formats=("DDS", "PNG")), "x.dds")
    with pytest.raises(PreprocessImageError, match="x.dds: format DDS is not allowed"):
        preprocess_load_image(dds, name="x.dds")  # the name every caller imports

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PIL's IM plugin is deprecated
        with pytest.raises(TypeError):  # the premise: PIL itself raises TypeError for these bytes
            with Image.open(io.BytesIO(IM_TYPE_ERROR), formats=["IM"]) as raw:
                raw.load()
        with pytest.raises(ImageError, match=r"^image x\.im: invalid size \(1\.5, 1\) in the header$"):
            decode(IM_TYPE_ERROR, ImageLimits(formats=("IM",)), "x.im")
        with pytest.raises(ImageError, match="not a recognised image format"):
            load_image(IM_TYPE_ERROR, name="x.im")


@pytest.mark.parametrize("error", [NotImplementedError, TypeError, struct.error, IndexError, ZeroDivisionError,
                                   MemoryError, OverflowError, EOFError, KeyError, RecursionError, OSError])
def test_any_exception_of_a_plugin_becomes_an_image_error(monkeypatch: pytest.MonkeyPatch,
                                                          error: type[BaseException]) -> None:
    def fail(self: ImageFile.ImageFile) -> None:
        raise error("boom\nforged line")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(ImageError, match=rf"^image a\.png: cannot decode \({error.__name__}: ") as caught:
        decode(encoded(Image.new("RGB", (4, 4)), "PNG"), ImageLimits(), "a.png")
    assert "\n" not in str(caught.value)  # an exception's message is escaped like a name


def test_size_cap_refuses_a_sparse_file_before_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "x.png"
    with open(big, "wb") as f:
        f.truncate(50 * 2**20)  # sparse: 50 MiB of size, no blocks
    limits = ImageLimits(max_bytes=2**20)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=rf"^image {big}: 52428800 bytes, over the limit of 1048576$"):
            read_file(big, limits)
        with pytest.raises(ImageError, match="52428800 bytes, over the limit"):
            load_image(big, limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, f"{peak} bytes allocated: the file was read"


def test_a_file_that_holds_more_than_its_size_says_stays_capped() -> None:
    """procfs files stat as 0 bytes and hold more, as a file growing while read does."""
    with pytest.raises(ImageError, match=r"^image maps: more than the limit of 64 bytes$"):
        read_file("/proc/self/maps", ImageLimits(max_bytes=64), name="maps")


def test_fifos_directories_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "queue.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    outcome: dict[str, str] = {}

    def read_fifo() -> None:
        try:
            read_file(fifo, ImageLimits())
        except ImageError as e:
            outcome["error"] = str(e)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome["error"] == f"image {fifo}: not a regular file (a fifo)"
    with pytest.raises(ImageError, match=r"folder\.png: not a regular file \(a directory\)$"):
        read_file(tmp_path / "folder.png", ImageLimits())
    with pytest.raises(ImageError, match=r"^image /dev/null: not a regular file \(a character device\)$"):
        load_image(Path("/dev/null"))


def test_read_errors_propagate_from_read_file_and_are_image_errors_from_load_image(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):  # the embedding job tells permanent from transient failures itself
        read_file(tmp_path / "missing.png", ImageLimits())
    with pytest.raises(ImageError, match=r"missing\.png: file not found$"):
        load_image(tmp_path / "missing.png")
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(OSError) as raised:
        read_file(loop, ImageLimits())
    assert not isinstance(raised.value, ImageError)
    with pytest.raises(ImageError, match=r"loop\.png: cannot read \(Too many levels of symbolic links\)$"):
        load_image(loop)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.png"
        locked.write_bytes(encoded(Image.new("RGB", (4, 4)), "PNG"))
        locked.chmod(0)
        with pytest.raises(PermissionError):
            read_file(locked, ImageLimits())
    with pytest.raises(ImageError, match=r"a\\x00b\.png: invalid path \(embedded null byte\)$"):
        read_file(str(tmp_path / "a\x00b.png"), ImageLimits())  # a name from a form or a command line
    good = tmp_path / "good.png"
    good.write_bytes(encoded(Image.new("RGB", (4, 4), RED), "PNG"))
    assert read_file(good, ImageLimits()) == good.read_bytes()


def test_read_stream_caps_and_reads_through_short_reads() -> None:
    class Trickle(io.RawIOBase):  # a network stream: a few bytes a call
        def __init__(self, data: bytes) -> None:
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return self.data.read(min(n, 7))

    data = encoded(Image.new("RGB", (8, 8), RED), "PNG")
    assert read_stream(Trickle(data), ImageLimits(), "s") == data
    with pytest.raises(ImageError, match=r"^image up\\nload: more than the limit of 10 bytes$"):
        read_stream(io.BytesIO(data), ImageLimits(max_bytes=10), "up\nload")


def test_pixel_cap_from_the_header() -> None:
    with pytest.raises(ImageError, match=r"^image b\.png: too large to decode \(Image size \(10000000000 pixels\)"):
        probe(png_header_only(100_000, 100_000), ImageLimits(), "b.png")  # PIL's own limit answers first
    with pytest.raises(ImageError, match=r"^image b\.png: too large to decode \(7000x7000 = 49000000 pixels, "
                                         r"over the limit of 40000000\)$"):
        probe(png_header_only(7000, 7000), ImageLimits(), "b.png")  # ours: below PIL's, above the cap
    small = encoded(Image.new("RGB", (20, 10), RED), "PNG")
    with pytest.raises(ImageError, match=r"20x10 = 200 pixels, over the limit of 100\)$"):
        decode(small, ImageLimits(max_pixels=100), "s.png")
    # The header is all probe reads: a PNG without pixel data probes, and does not decode.
    assert probe(png_header_only(30, 20), ImageLimits(), "h.png") == images.Probe("PNG", 30, 20, "image/png")
    with pytest.raises(ImageError, match="h.png: cannot decode"):
        decode(png_header_only(30, 20), ImageLimits(), "h.png")


def test_empty_and_oversized_bytes() -> None:
    with pytest.raises(ImageError, match=r"^image <bytes>: empty \(0 bytes\)$"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"^image u: 9 bytes, over the limit of 8$"):
        decode(b"123456789", ImageLimits(max_bytes=8), "u")


def test_allow_list() -> None:
    pcx = encoded(Image.new("RGB", (6, 4), RED), "PCX")
    with pytest.raises(ImageError, match=r"^image a\.pcx: format PCX is not allowed \(allowed: JPEG, PNG, WEBP, "
                                         r"GIF, BMP, TIFF\)$"):
        decode(pcx, ImageLimits(), "a.pcx")
    decoded = decode(pcx, ImageLimits(formats=(*DEFAULT_FORMATS, "pcx")), "a.pcx")
    assert (decoded.format, decoded.mime, decoded.image.getpixel((0, 0))) == ("PCX", "image/x-pcx", RED)
    ico = encoded(Image.new("RGB", (16, 16), BLUE), "ICO")
    with pytest.raises(ImageError, match="format ICO is not allowed"):
        decode(ico, ImageLimits(formats=("PNG",)), "a.ico")
    assert decode(ico, ImageLimits(formats=("ICO",)), "a.ico").image.getpixel((0, 0)) == BLUE
    # The default formats, each read back with its MIME type; PIL knows them all and has a MIME type for each.
    assert set(DEFAULT_FORMATS) <= set(decodable_formats())
    for fmt in DEFAULT_FORMATS:
        found = probe(encoded(Image.new("RGB", (5, 3), RED), fmt), ImageLimits(), "x")
        assert (found.format, found.width, found.height, found.mime) == (fmt, 5, 3, Image.MIME[fmt])
    # A phone's multi-picture JPEG opens in PIL as "MPO": it is a JPEG, allowed as one.
    mpo = encoded(Image.new("RGB", (8, 8), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert probe(mpo, ImageLimits(formats=("JPEG",)), "p.jpg") == images.Probe("JPEG", 8, 8, "image/jpeg")


def test_limits_are_checked_and_normalised() -> None:
    assert ImageLimits(formats=(" png", "Jpeg", "PNG")).formats == ("PNG", "JPEG")
    with pytest.raises(ValueError, match="max_bytes must be positive, got 0"):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError, match="max_pixels must be positive, got -1"):
        ImageLimits(max_pixels=-1)
    with pytest.raises(ValueError, match=r"formats \['XYZ'\] are not formats this PIL can decode; known: .*JPEG"):
        ImageLimits(formats=("PNG", "XYZ"))
    with pytest.raises(ValueError, match=r"formats EPS \(PIL decodes it by running Ghostscript on the bytes\) "
                                         "cannot be allowed"):
        ImageLimits(formats=("PNG", "eps"))
    with pytest.raises(ValueError, match="formats must name at least one format"):
        ImageLimits(formats=())
    with pytest.raises(ValueError, match="formats='PNG' must be a list of format names"):
        ImageLimits(formats="PNG")  # type: ignore[arg-type]


def test_names_cannot_forge_log_lines() -> None:
    with pytest.raises(ImageError) as caught:
        load_image(b"not an image", name="a.png\nimage b.png: decoded fine\x1b[2K")
    assert str(caught.value) == (r"image a.png\nimage b.png: decoded fine\x1b[2K: cannot decode (not a recognised "
                                 "image format)")


def rgb_of(image: Image.Image) -> tuple[int, ...]:
    out = to_rgb(image)
    assert out.mode == "RGB" and out is not image and out.size == image.size
    return out.getpixel((0, 0))


def with_info(image: Image.Image, **info: object) -> Image.Image:
    image.info.update(info)
    return image


def palette(colour: tuple[int, int, int], transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, *colour] + [0] * 762)
    return with_info(image, transparency=1) if transparent else image


@pytest.mark.parametrize("image, expected, tolerance", [
    (Image.new("1", (2, 2), 1), WHITE, 0),
    (Image.new("L", (2, 2), 200), (200, 200, 200), 0),
    (with_info(Image.new("L", (2, 2), 7), transparency=7), WHITE, 0),
    (palette(RED, transparent=False), RED, 0),
    (palette(RED, transparent=True), WHITE, 0),  # transparent pixels composite over white, not black
    (Image.new("LA", (2, 2), (100, 255)), (100, 100, 100), 0),
    (Image.new("LA", (2, 2), (100, 0)), WHITE, 0),
    (Image.new("LA", (2, 2), (0, 128)), (127, 127, 127), 1),  # half black over white
    (Image.new("La", (2, 2), (50, 128)), (177, 177, 177), 1),  # premultiplied: 99 at alpha 0.5 over white
    (Image.new("PA", (2, 2), (0, 0)), WHITE, 0),
    (Image.new("RGBA", (2, 2), (*RED, 255)), RED, 0),
    (Image.new("RGBA", (2, 2), (10, 20, 30, 0)), WHITE, 0),
    (Image.new("RGBa", (2, 2), (50, 0, 0, 128)), (177, 127, 127), 1),
    (with_info(Image.new("RGB", (2, 2), RED), transparency=RED), WHITE, 0),  # a PNG's tRNS colour
    (Image.new("I", (2, 2), 32768), (128, 128, 128), 0),  # read as 16-bit
    (Image.new("I", (2, 2), 70_000), WHITE, 0),  # beyond 16 bits: clipped to 65535 first
    (Image.new("I", (2, 2), -5), (0, 0, 0), 0),
    (Image.new("I;16", (2, 2), 32768), (128, 128, 128), 0),  # not clipped to white, as convert("RGB") does
    (Image.new("I;16", (2, 2), 65535), WHITE, 0),
    (Image.new("I;16", (2, 2), 257), (1, 1, 1), 0),
    (Image.new("I;16B", (2, 2), 32768), (128, 128, 128), 0),
    (Image.new("I;16L", (2, 2), 32768), (128, 128, 128), 0),
    (Image.new("I;16N", (2, 2), 32768), (128, 128, 128), 0),
    (with_info(Image.new("I;16", (2, 2), 500), transparency=500), WHITE, 0),
    (Image.new("F", (2, 2), 0.5), (128, 128, 128), 0),  # all values in [0, 1]: scaled by 255
    (Image.new("F", (2, 2), 100.0), (100, 100, 100), 0),  # 0..255 scale kept
    (Image.new("F", (2, 2), 300.0), WHITE, 0),  # clipped
    (Image.new("F", (2, 2), float("nan")), (0, 0, 0), 0),
    (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0), 0),
    (Image.new("YCbCr", (2, 2), (76, 85, 255)), (254, 0, 0), 1),
    (Image.new("LAB", (2, 2), (255, 128, 128)), WHITE, 1),
    (Image.new("HSV", (2, 2), (0, 255, 255)), (255, 0, 0), 0),
    (Image.new("RGBX", (2, 2), (1, 2, 3, 0)), (1, 2, 3), 0),
    (Image.new("RGB", (2, 2), BLUE), BLUE, 0),
], ids=lambda v: v.mode + ("+trns" if "transparency" in v.info else "") if isinstance(v, Image.Image) else "")
def test_to_rgb_converts_every_mode_honestly(image: Image.Image, expected: tuple[int, ...], tolerance: int) -> None:
    got = rgb_of(image)
    assert all(abs(g - e) <= tolerance for g, e in zip(got, expected)), f"{image.mode}: {got} != {expected}"


def test_float_images_outside_zero_one_keep_their_scale() -> None:
    values = np.array([[0.0, 100.0], [200.0, 1.0]], dtype=np.float32)
    out = np.asarray(to_rgb(Image.fromarray(values, "F")))[..., 0]
    assert out.tolist() == [[0, 100], [200, 1]]


def test_files_decode_to_what_a_viewer_shows() -> None:
    limits = ImageLimits()
    gray16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert decode(encoded(gray16, "PNG"), limits, "g").image.getpixel((0, 0)) == (128, 128, 128)
    tiff16 = decode(encoded(gray16, "TIFF"), limits, "g")
    assert (tiff16.format, tiff16.image.getpixel((0, 0))) == ("TIFF", (128, 128, 128))

    cmyk = decode(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), limits, "c")
    assert all(abs(g - e) <= 3 for g, e in zip(cmyk.image.getpixel((4, 4)), (255, 0, 0)))

    cut_out = palette(RED, transparent=True)
    cut_out.putpixel((0, 0), 0)  # palette index 0 is black and opaque
    flat = decode(encoded(cut_out, "PNG"), limits, "p").image
    assert flat.getpixel((0, 0)) == (0, 0, 0) and flat.getpixel((1, 1)) == WHITE

    la = Image.new("LA", (2, 1), (90, 255))
    la.putpixel((1, 0), (90, 0))
    assert decode(encoded(la, "PNG"), limits, "la").image.getpixel((1, 0)) == WHITE

    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    for fmt in ("GIF", "WEBP", "PNG"):
        animated = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], **(
            {"lossless": True} if fmt == "WEBP" else {}))
        got = decode(animated, limits, fmt).image.getpixel((4, 4))
        assert all(abs(g - e) <= 8 for g, e in zip(got, RED)), f"{fmt} frame 0: {got}"
    pages = encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert decode(pages, limits, "t").image.getpixel((0, 0)) == RED


def test_exif_orientation_makes_a_phone_photo_upright() -> None:
    stored = Image.new("RGB", (32, 16), RED)
    stored.paste(BLUE, (16, 0, 32, 16))  # left red, right blue, as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the left half ends on top
    out = decode(encoded(stored, "JPEG", exif=exif.tobytes(), quality=95), ImageLimits(), "photo.jpg").image
    assert out.size == (16, 32)
    top, bottom = out.getpixel((8, 4)), out.getpixel((8, 28))
    assert all(abs(g - e) <= 8 for g, e in zip(top, RED)) and all(abs(g - e) <= 8 for g, e in zip(bottom, BLUE))


def test_a_malformed_exif_block_does_not_cost_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Image.Image) -> Image.Exif:
        raise struct.error("unpack requires a buffer of 12 bytes")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert to_rgb(Image.new("RGB", (3, 2), RED)).getpixel((0, 0)) == RED


def test_a_mode_without_an_honest_conversion_is_an_image_error() -> None:
    image = Image.new("L", (2, 2))
    image._mode = "BGR;15\n"  # what a plugin may declare (IM headers name any mode); set directly for the test
    with pytest.raises(ImageError, match=r"^image a\.im: mode BGR;15\\n cannot be converted to RGB$"):
        to_rgb(image, name="a.im")
