"""Recall of a CIR split's queries through the search library: the one query path, measured end to end.

The catalog must hold the split's gallery images (an embedding snapshot over them, any ids); catalog entries are
matched to the split's images by file (queries.catalog_ids, as index tuning matches references). The split's
protocol says whether a query's reference image leaves its results: CIRR (and shapes) remove it, FashionIQ keeps
it (`CIRSplit.remove_reference`), so the numbers are comparable with the evaluator's R@K.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cirflow.indexing.index.queries import catalog_ids
from cirflow.indexing.search import Searcher, index_store
from cirflow.models.data.loaders import load_split


def recall_through_search(searcher: Searcher, kind: str, root: Path, split: str,
                          ks: Sequence[int] = (1, 5, 10, 50), batch_size: int = 256) -> dict[str, float]:
    data = load_split(kind, root, split)
    ids, uris = index_store.read_uris(searcher.index.index_dir)
    names = list(data.images)
    found = catalog_ids([str(data.images[n]) for n in names], ids, uris.to_pylist())
    missing = [n for n, i in zip(names, found.tolist()) if i < 0]
    if missing:
        raise ValueError(f"the index {searcher.index.index_dir} lacks {len(missing)} images of {data.name}'s "
                         f"gallery (e.g. {missing[:3]}); embed the split's images as the catalog")
    id_of = dict(zip(names, found.tolist()))
    name_of = {i: n for n, i in id_of.items()}
    queries = [q for q in data.queries if q.target is not None]
    if not queries:
        raise ValueError(f"{data.name} has no queries with targets to measure recall on")
    k = max(ks)
    ranks = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        exclude = [id_of[q.reference] for q in batch] if data.remove_reference else None
        results = searcher.search_batch([data.images[q.reference] for q in batch], [q.caption for q in batch], k,
                                        exclude)
        for q, result in zip(batch, results):
            ranked = [name_of.get(int(i)) for i in result.ids]
            ranks.append(ranked.index(q.target) if q.target in ranked else k)
    ranks_array = np.array(ranks)
    return {f"R@{k}": float(np.mean(ranks_array < k)) for k in ks}
