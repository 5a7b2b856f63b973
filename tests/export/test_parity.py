"""ORT bundle vs eager PyTorch, for every registered composer (new composers are covered automatically)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cirflow.export.runtime import BundleRuntime
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.composers import COMPOSERS, ComposerConfig, build_composer
from cirflow.models.preprocess import PreprocessConfig, normalize_uint8, preprocess_images
from cirflow.models.tiny import CAPTIONS
from cirflow.models.tokenizer import encode_texts
from tests.export.conftest import assert_same_top_k, random_images

ATOL = 1e-4


def _tokens(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids with [CLS]-like first tokens and ragged padding (row i keeps 1 + i % length tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, (batch, length), dtype=np.int64)
    keep = 1 + np.arange(batch) % length
    mask = (np.arange(length)[None, :] < keep[:, None]).astype(np.int64)
    return ids * mask, mask  # padded positions hold [PAD] = 0, as the tokenizer writes them


@pytest.mark.parametrize("composer", sorted(COMPOSERS))
def test_encoders_match_pytorch(composer: str, bundle_for) -> None:
    ckpt, bundle = bundle_for(composer)
    loaded = load_checkpoint(ckpt)
    model, pre = loaded.model, loaded.config.preprocess
    runtime = BundleRuntime.load(bundle, providers="cpu")
    vocab = loaded.config.model.text.vocab_size
    for batch in (1, 33):
        pixels = normalize_uint8(random_images(batch, pre.size, seed=batch), pre)
        with torch.inference_mode():
            expected = model.encode_image(torch.from_numpy(pixels)).numpy()
        np.testing.assert_allclose(runtime.encode_images(pixels), expected, atol=ATOL, rtol=0)
        for length in (3, 9, 32):
            ids, mask = _tokens(batch, length, vocab, seed=length)
            with torch.inference_mode():
                expected = model.compose(*(torch.from_numpy(a) for a in (pixels, ids, mask))).numpy()
            got = runtime.encode_queries(pixels, ids, mask)
            assert got.shape == (batch, model.embed_dim) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=f"B={batch} L={length}")
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
            with torch.inference_mode():
                expected = model.encode_text(*(torch.from_numpy(a) for a in (ids, mask))).numpy()
            np.testing.assert_allclose(runtime.encode_texts(ids, mask), expected, atol=ATOL, rtol=0,
                                       err_msg=f"text encoder B={batch} L={length}")
            if runtime.reranks:
                check_reranker(model, runtime, pixels, ids, mask)
    assert runtime.reranks == (composer == "artemis")  # ARTEMIS's normalised target: the one that re-ranks


def check_reranker(model: torch.nn.Module, runtime: BundleRuntime, pixels: np.ndarray, ids: np.ndarray,
                   mask: np.ndarray) -> None:
    """The query graph's features and the re-ranker's scores against PyTorch, for a few candidate counts."""
    with torch.inference_mode():
        f = model.features(*(torch.from_numpy(a) for a in (pixels, ids, mask)))
        features = model.composer.query_features(f.v, f.t).numpy()
    query, got = runtime.encode_queries_with_features(pixels, ids, mask)
    np.testing.assert_allclose(got, features, atol=ATOL, rtol=0)
    np.testing.assert_allclose(query, runtime.encode_queries(pixels, ids, mask), atol=0, rtol=0)
    rng = np.random.default_rng(len(pixels))
    for n in (1, 10, 200):
        candidates = rng.standard_normal((len(pixels), n, model.embed_dim)).astype(np.float32)
        candidates /= np.linalg.norm(candidates, axis=2, keepdims=True)
        with torch.inference_mode():
            expected = model.composer.score(torch.from_numpy(features), torch.from_numpy(candidates)).numpy()
        np.testing.assert_allclose(runtime.rescore(features, candidates), expected, atol=ATOL, rtol=0)


def test_atf_parity_covers_the_fusion_branch(bundle_for) -> None:
    """The atf bundle's fusion weights are not zero, so its queries differ from the sum composer's (same
    encoders) by far more than the parity tolerance: a graph that lost the ATF branch, or any part of it that
    an untrained ATF leaves at zero, cannot pass test_encoders_match_pytorch."""
    ckpt, bundle = bundle_for("atf")
    loaded = load_checkpoint(ckpt)
    model, composer = loaded.model, loaded.model.composer
    assert all(p.any() for p in (composer.proj.weight, composer.proj.bias, composer.text_type))
    pixels = normalize_uint8(random_images(8, 64, seed=11), loaded.config.preprocess)
    ids, mask = _tokens(8, 12, model.config.text.vocab_size, seed=12)
    plain_sum = build_composer(model.embed_dim, model.config.image.dim, ComposerConfig(name="sum"))
    with torch.inference_mode():
        features = model.features(*(torch.from_numpy(a) for a in (pixels, ids, mask)))
        atf, summed = model.compose_features(features).numpy(), model.compose_features(features, plain_sum).numpy()
    got = BundleRuntime.load(bundle, providers="cpu").encode_queries(pixels, ids, mask)
    np.testing.assert_allclose(got, atf, atol=ATOL, rtol=0)
    assert np.abs(got - summed).max(axis=1).min() > 100 * ATOL  # every query, not just one


@pytest.mark.parametrize("composer", sorted(COMPOSERS))
def test_retrieval_top10_matches_pytorch(composer: str, bundle_for) -> None:
    """Images and texts through the runtime's convenience path (training's preprocessing and tokenizer)
    retrieve the same top-10 from a small gallery as the PyTorch model does."""
    ckpt, bundle = bundle_for(composer)
    loaded = load_checkpoint(ckpt)
    model, pre, tok = loaded.model, loaded.config.preprocess, loaded.tokenizer
    runtime = BundleRuntime.load(bundle, providers="cpu")
    gallery = [Image.fromarray(a) for a in random_images(80, 48, seed=1)]  # 48 px: the runtime resizes to 64
    refs = [Image.fromarray(a) for a in random_images(len(CAPTIONS) * 3, 72, seed=2)]
    texts = [CAPTIONS[i % len(CAPTIONS)] + " " * (i % 2) for i in range(len(refs))]

    g_ort, q_ort = runtime.embed_images(gallery), runtime.embed_queries(refs, texts)
    with torch.inference_mode():
        g_pt = model.encode_image(torch.from_numpy(preprocess_images(gallery, pre))).numpy()
        ids, mask = encode_texts(tok, texts)
        q_pt = model.compose(torch.from_numpy(preprocess_images(refs, pre)), torch.from_numpy(ids),
                             torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(q_ort, q_pt, atol=ATOL, rtol=0)
    assert_same_top_k(q_ort @ g_ort.T, q_pt @ g_pt.T, k=10)


def test_preprocess_config_travels_with_the_bundle(bundle_for) -> None:
    ckpt, bundle = bundle_for(sorted(COMPOSERS)[0])
    runtime = BundleRuntime.load(bundle, providers="cpu")
    assert runtime.preprocess == load_checkpoint(ckpt).config.preprocess
    assert isinstance(runtime.preprocess, PreprocessConfig)
