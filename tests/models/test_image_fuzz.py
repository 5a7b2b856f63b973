"""Fuzzing the image gate in the default suite: seeded mutants of every allowed format through `decode`, bounded
by count (and by time on a slow machine). Each must decode to an RGB image within the pixel cap or raise
ImageError; any other outcome is a crash of the gate. The generator is bench/fuzz_images.py's, whose long runs are
recorded in docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cirflow.models.images import DEFAULT_FORMATS, ImageError, ImageLimits, decode, probe
from tests.bench.scripts import load_bench_script

fuzz = load_bench_script("fuzz_images")

INPUTS = 15_000  # about 5 s on a quiet core of the 2-core CI machine
BUDGET_S = 20.0  # the cap when other jobs share the cores
HANG_S = 10.0  # one input decoding this long is a hang, not a slow decoder
# A lower pixel cap than the default keeps the mutants whose headers claim large sizes cheap; the cap's logic is
# the same at any value.
LIMITS = ImageLimits(max_pixels=2_000_000)


def test_every_fuzzed_input_decodes_or_is_an_image_error() -> None:
    with fuzz.quiet_stderr():
        result = fuzz.run(BUDGET_S, seed=0, limits=LIMITS, max_inputs=INPUTS)
    crashes = [f"{c['name']}: {c['type']}: {c['message']}" for c in result["crash_list"]]
    assert result["crashes"] == 0, "\n".join(crashes)
    assert set(result["formats"]) == set(DEFAULT_FORMATS)
    for fmt, counts in result["formats"].items():  # every format fed, and both sides of the gate reached
        assert counts.get("tried", 0) > 0, fmt
        assert counts.get("decoded", 0) > 0 and counts.get("image_errors", 0) > 0, (fmt, counts)
    assert result["tried"] == result["decoded"] + result["image_errors"]
    assert result["slowest"]["seconds"] < HANG_S, result["slowest"]


def test_seeds_are_valid_images_of_every_format_and_mode() -> None:
    seeds = fuzz.seeds(DEFAULT_FORMATS)
    assert {name.split("-", 1)[0] for name in seeds} == set(DEFAULT_FORMATS)
    for name, data in seeds.items():
        decoded = decode(data, ImageLimits(), name)
        assert decoded.image.mode == "RGB" and decoded.format == name.split("-", 1)[0], name
    for wanted in ("PNG-16bit", "PNG-palette-trns", "PNG-apng", "JPEG-cmyk", "GIF-anim", "WEBP-anim", "TIFF-float",
                   "TIFF-multipage", "JPEG-exif-rotated"):
        assert wanted in seeds
    assert fuzz.seeds(("PCX",)).keys() == {"PCX-rgb", "PCX-gray"}  # a format without its own list: generic seeds


def test_mutations_are_seeded_and_named() -> None:
    seeds = fuzz.seeds(("PNG", "GIF"))

    def first(seed: int) -> list[tuple[str, bytes]]:
        stream = fuzz.mutations(seed, seeds)
        return [next(stream) for _ in range(200)]

    a = first(1)
    assert a == first(1) and a != first(2)
    names = [name for name, _ in a]
    assert names[0].startswith("GIF-") and names[1].startswith("PNG-")  # formats take turns
    assert names[7].endswith("-7") and all(data for _, data in a)
    kinds = {kind for name in names for kind in name.split("-")[-2].split("+")}
    assert kinds == set(fuzz.MUTATIONS)


def test_huge_dimensions_are_written_where_each_format_keeps_them() -> None:
    for name, data in fuzz.seeds(DEFAULT_FORMATS).items():
        fields = fuzz._dimension_fields(data)
        assert fields, name
        grown = bytearray(data)
        for offset, width, order in fields:
            grown[offset:offset + width] = (0xFFFF).to_bytes(width, "little" if order == "<" else "big")
        try:  # 0xffff x 0xffff where the fields are 16 bits or more: refused from the header
            found = probe(bytes(fuzz._fix_png_crcs(grown)), LIMITS, name)
        except ImageError as e:
            assert "too large to decode" in str(e), name
        else:  # lossless WEBP packs both sides in one 32-bit word: the width alone grew
            assert max(found.width, found.height) >= 0x3FFF, (name, found)


def test_main_writes_results_reproducers_and_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke run into a temporary doc, with one crash planted: the reproducer is written and the run fails."""
    real = fuzz.decode

    def planted(data: bytes, limits: ImageLimits, name: str) -> object:
        if name.endswith("-3"):
            raise KeyError("planted")
        return real(data, limits, name)

    monkeypatch.setattr(fuzz, "decode", planted)
    doc = tmp_path / "bench.md"
    code = fuzz.main(["--seconds", "1", "--seed", "5", "--out", str(tmp_path / "out"), "--doc", str(doc)])
    assert code == 1
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    (crash,) = result["crash_list"]
    assert crash["type"] == "KeyError" and crash["name"].endswith("-3")
    stream = fuzz.mutations(5, fuzz.seeds(DEFAULT_FORMATS))  # the reproducer is the input, byte for byte
    assert Path(crash["file"]).read_bytes() == dict(next(stream) for _ in range(4))[crash["name"]]
    text = doc.read_text()
    assert "<!-- begin fuzz_images -->" in text and "**Crashes: 1**" in text and "| **all** |" in text
    assert f"- {crash['name']}: KeyError: 'planted'" in capsys.readouterr().out  # the section is printed too
