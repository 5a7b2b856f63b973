import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirflow.models.preprocess import (
    ImageError,
    PreprocessConfig,
    load_image,
    load_uint8_images,
    normalize_uint8,
    resize_uint8,
)
from cirflow.models.tokenizer import TokenizerConfig, encode_texts, tokenizer_from_json, train_tokenizer

CAPTIONS = ["make the red circle blue", "add a small green square on the left", "remove the big triangle"]


def test_tokenizer_pads_truncates_and_roundtrips() -> None:
    tok = train_tokenizer(CAPTIONS * 5, TokenizerConfig(vocab_size=200, max_length=6))
    ids, mask = encode_texts(tok, ["make the circle blue", "remove the"])
    assert ids.shape == mask.shape == (2, 6) and ids.dtype == np.int64
    assert ids[0, 0] == tok.token_to_id("[CLS]") and ids[0, -1] == tok.token_to_id("[SEP]")  # truncated
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0] and ids[1, 4:].tolist() == [0, 0]  # [PAD] is id 0
    again = tokenizer_from_json(tok.to_str())
    assert np.array_equal(encode_texts(again, ["MAKE the Circle"])[0], encode_texts(tok, ["make the circle"])[0])


def test_vocabulary_is_deterministic_and_spells_unseen_words() -> None:
    config = TokenizerConfig(vocab_size=80)
    texts = [tok.to_str() for tok in (train_tokenizer(CAPTIONS, config) for _ in range(3))]
    assert texts[0] == texts[1] == texts[2]  # tokenizers' own WordPiece trainer failed this
    tok = train_tokenizer(CAPTIONS, config)
    ids, _ = encode_texts(tok, ["make the circle crimson"])
    assert tok.token_to_id("[UNK]") not in ids[0]  # unseen word -> character pieces
    assert tok.decode(ids[0].tolist(), skip_special_tokens=True) == "make the circle crimson"
    with pytest.raises(ValueError, match="vocab_size=10 is below"):
        train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=10))


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.png: cannot decode"):
        load_image(bad)
    with pytest.raises(ImageError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png")


def test_load_converts_modes_and_resizes(tmp_path: Path) -> None:
    Image.new("L", (100, 80), 200).save(tmp_path / "gray.png")
    Image.new("RGBA", (64, 64), (10, 20, 30, 255)).save(tmp_path / "rgba.png")
    px = load_uint8_images([tmp_path / "gray.png", tmp_path / "rgba.png"], PreprocessConfig(size=64))
    assert px.shape == (2, 64, 64, 3) and px.dtype == np.uint8
    assert px[1, 0, 0].tolist() == [10, 20, 30]


def test_normalize_checks_layout() -> None:
    cfg = PreprocessConfig(size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = normalize_uint8(np.full((1, 4, 4, 3), 255, np.uint8), cfg)
    assert out.shape == (1, 3, 4, 4) and np.allclose(out, 1.0)
    with pytest.raises(ImageError, match="uint8"):
        normalize_uint8(np.zeros((1, 4, 4, 3), np.float32), cfg)
    with pytest.raises(ImageError, match="expected 4x4 pixels, got 5x5"):
        normalize_uint8(np.zeros((1, 5, 5, 3), np.uint8), cfg)
    with pytest.raises(ValueError, match="resize='area' is not one of"):
        PreprocessConfig(resize="area")


def decompression_bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels (10^10 by default, over PIL's decompression-bomb limit) and
    holds none: PIL refuses it from the header alone, so the test costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_over_the_decompression_bomb_limit_is_a_bad_image(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(decompression_bomb_png())
    with pytest.raises(ImageError, match=r"bomb.png: too large to decode \(Image size \(10000000000 pixels\)"):
        load_image(bomb)
    with pytest.raises(ImageError, match="image <bytes>: too large to decode"):
        load_image(bomb.read_bytes())
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # a real image, over a lowered limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageError, match="big.png: too large to decode"):
        load_image(tmp_path / "big.png")
    # Between the limit and twice it PIL only warns, and would decode: refused all the same.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="big.png: too large to decode"):
        load_image(tmp_path / "big.png")


def test_decode_errors_are_deterministic(tmp_path: Path) -> None:
    """No object repr (`<_io.BytesIO object at 0x...>`) in the reason: the same bytes give the same message."""
    reasons = set()
    for _ in range(3):
        with pytest.raises(ImageError) as caught:
            load_image(b"not an image", name="x.png")
        reasons.add(str(caught.value))
    assert reasons == {"image x.png: cannot decode (not a recognised image format)"}


def test_resize_modes_stretch_crop_and_targetpad() -> None:
    """A 200x100 image whose left half is red and right half blue, with a green 20 px border band at the far
    right: stretch keeps everything, center_crop cuts the sides off, targetpad (CLIP4Cir) pads to 1.25 first so
    less is cut and the padding shows as black top and bottom."""
    image = Image.new("RGB", (200, 100), (220, 40, 40))
    image.paste((40, 70, 220), (100, 0, 200, 100))
    image.paste((40, 170, 60), (180, 0, 200, 100))
    size = 50

    def pixels(mode: str) -> np.ndarray:
        return resize_uint8(image, PreprocessConfig(size=size, mode=mode, resize="nearest"))

    stretch, crop, pad = pixels("stretch"), pixels("center_crop"), pixels("targetpad")
    assert stretch.shape == crop.shape == pad.shape == (size, size, 3)
    assert tuple(stretch[25, -1]) == (40, 170, 60)  # the green band survives a stretch
    assert tuple(crop[25, 0]) == (220, 40, 40) and tuple(crop[25, -1]) == (40, 70, 220)  # centre only: no green
    assert tuple(crop[0, 25]) != (0, 0, 0)
    assert tuple(pad[0, 25]) == (0, 0, 0) and tuple(pad[25, 25]) != (0, 0, 0)  # black bands from the padding
    # Near-square images are not padded (ratio below 1.25), only cropped.
    square = Image.new("RGB", (110, 100), (10, 20, 30))
    np.testing.assert_array_equal(resize_uint8(square, PreprocessConfig(size=size, mode="targetpad")),
                                  resize_uint8(square, PreprocessConfig(size=size, mode="center_crop")))
    with pytest.raises(ValueError, match="mode='fit'"):
        PreprocessConfig(mode="fit")
    with pytest.raises(ValueError, match="target_ratio=0.5"):
        PreprocessConfig(target_ratio=0.5)
