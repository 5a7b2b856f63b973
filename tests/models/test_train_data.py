from pathlib import Path

import numpy as np
import torch

from cirflow.models.data.loaders import load_split
from cirflow.models.preprocess import PreprocessConfig
from cirflow.models.tokenizer import TokenizerConfig, train_tokenizer
from cirflow.models.train_data import TripletBatches


def batches(root: Path, **kwargs: object) -> TripletBatches:
    split = load_split("shapes", root, "train")
    tok = train_tokenizer([q.caption for q in split.queries], TokenizerConfig(vocab_size=300))
    return TripletBatches(split, tok, PreprocessConfig(), **kwargs)


def test_batches_index_distinct_images(tiny_shapes: Path) -> None:
    data = batches(tiny_shapes, hard_negatives=1)
    b = next(data.epoch(seed=0, epoch=0, batch_size=16))
    assert b.reference.shape == b.target.shape == (16,) and b.ids.shape[0] == 16
    flat = b.images.flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)  # each image once
    assert len(b.images) <= 16 * 3 and not torch.equal(b.reference, b.target)


def test_grouped_batches_hold_whole_image_sets(tiny_shapes: Path) -> None:
    data = batches(tiny_shapes, hard_negatives=0)
    b = next(data.epoch(seed=0, epoch=0, batch_size=32))
    # Queries of one set share the reference, so 32 queries need far fewer than 32 reference encodes.
    assert len(torch.unique(b.reference)) < 16
    ungrouped = batches(tiny_shapes, hard_negatives=0, group_by_set=False)
    b2 = next(ungrouped.epoch(seed=0, epoch=0, batch_size=32))
    assert len(torch.unique(b2.reference)) > len(torch.unique(b.reference))


def test_epochs_are_seeded_and_resumable(tiny_shapes: Path) -> None:
    data = batches(tiny_shapes, hard_negatives=1)
    full = list(data.epoch(seed=3, epoch=1, batch_size=16))
    resumed = list(data.epoch(seed=3, epoch=1, batch_size=16, skip=2))
    assert len(full) == len(data) // 16 and len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.ids, b.ids)
    other = next(data.epoch(seed=3, epoch=2, batch_size=16))
    assert not torch.equal(other.ids, full[0].ids)
    assert np.array_equal(sorted(np.concatenate(data.groups)), np.arange(len(data)))


def test_siblings_are_decoded_only_for_hard_negatives(tiny_shapes: Path) -> None:
    split = load_split("shapes", tiny_shapes, "train")
    needed = {n for q in split.queries for n in (q.reference, q.target)}
    assert len(batches(tiny_shapes, hard_negatives=0).pixels) == len(needed)
    assert len(batches(tiny_shapes, hard_negatives=1).pixels) > len(needed)
