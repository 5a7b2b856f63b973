"""Tiny seeded checkpoints and their bundles, exported once per session per composer (an export takes seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from cirflow.export.bundle import export_bundle
from cirflow.models.tiny import make_checkpoint


def bundle_checkpoint(path: Path, composer: str, seed: int = 0, **extra: Any) -> Path:
    """The checkpoints behind `bundle_for`: untrained (parity needs no training) but with every zero-initialised
    parameter filled, so that parity sees every branch (an untrained ATF would equal the sum composer), and
    with a step and metrics for the manifest to record."""
    return make_checkpoint(path, composer, seed, fill_zeros=True, step=7, metrics={"val": {"R@1": 0.25}}, **extra)


@pytest.fixture(scope="session")
def bundle_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """composer -> (checkpoint, bundle directory), built on first use and shared by the session's tests.
    Tests that alter a bundle copy it first."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(composer: str) -> tuple[Path, Path]:
        if composer not in built:
            root = tmp_path_factory.mktemp(f"bundle-{composer}")
            ckpt = bundle_checkpoint(root / "model.pt", composer)
            built[composer] = (ckpt, export_bundle(ckpt, root / "bundle"))
        return built[composer]

    return get


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8: blocks of colour on noise, so that images differ by more than noise."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    blocks = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8).repeat(size // 4, 1).repeat(size // 4, 2)
    return ((out.astype(np.uint16) + 3 * blocks.astype(np.uint16)) // 4).astype(np.uint8)


def assert_same_top_k(a: np.ndarray, b: np.ndarray, k: int, tol: float = 1e-6) -> None:
    """Rankings of (Q, G) scores `a` and `b` agree in their top k; a position may differ only where the two
    swapped items tie in `a` within `tol` (the faiss contrib way of comparing kNN results)."""
    ta = np.argsort(-a, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b, axis=1, kind="stable")[:, :k]
    for q, p in zip(*np.nonzero(ta != tb)):
        gap = abs(a[q, ta[q, p]] - a[q, tb[q, p]])
        assert gap <= tol, f"query {q}, rank {p}: {ta[q, p]} vs {tb[q, p]}, scores differ by {gap:.2e}"
