"""Recall of a CIR split's queries through the search library: the one query path, measured end to end.

The catalog must hold the split's gallery images (an embedding run over them, any ids); catalog entries are
matched to the split's image names by resolved file path. As in the CIRR protocol, each query's reference
image is excluded from its results, so the numbers are comparable with the evaluator's R@K.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cirflow.indexing import index_store
from cirflow.indexing.search import Searcher
from cirflow.models.data.loaders import load_split


def recall_through_search(searcher: Searcher, kind: str, root: Path, split: str,
                          ks: Sequence[int] = (1, 5, 10, 50), batch_size: int = 256) -> dict[str, float]:
    data = load_split(kind, root, split)
    ids, uris = index_store.read_uris(searcher.index.index_dir)
    id_of = {str(Path(u).resolve()): int(i) for i, u in zip(ids.tolist(), uris.to_pylist())}
    name_of = {i: name for name, path in data.images.items()
               if (i := id_of.get(str(Path(path).resolve()))) is not None}
    missing = sorted(n for n in data.images if str(Path(data.images[n]).resolve()) not in id_of)
    if missing:
        raise ValueError(f"the index {searcher.index.index_dir} lacks {len(missing)} images of {data.name}'s "
                         f"gallery (e.g. {missing[:3]}); embed the split's images as the catalog")
    queries = [q for q in data.queries if q.target is not None]
    if not queries:
        raise ValueError(f"{data.name} has no queries with targets to measure recall on")
    k = max(ks)
    ranks = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        results = searcher.search_batch([data.images[q.reference] for q in batch], [q.caption for q in batch], k,
                                        [id_of[str(Path(data.images[q.reference]).resolve())] for q in batch])
        for q, result in zip(batch, results):
            names = [name_of.get(int(i)) for i in result.ids]
            ranks.append(names.index(q.target) if q.target in names else k)
    ranks_array = np.array(ranks)
    return {f"R@{k}": float(np.mean(ranks_array < k)) for k in ks}
