"""The search library (`from cirflow.indexing.search import Searcher`): an index version loaded, queries in, catalog
ids out. Reads what indexing/index/ writes; imports indexing/embedding/ only for the catalog's metadata types.

    searcher.py      Searcher: reference image + text through the bundle's encoder, then the index
    vector_index.py  VectorIndex: loading and placement, plain search, and the dispatch to the three below
    rerank.py        a compressed index's candidates re-scored from float16 vectors
    sharded.py       ShardedIndex: a sharded version's shards searched and merged; load_index, any version
    overlay.py       an overlay version's base without its dead ids, merged with its delta
    filtered.py      search among allowed ids: faiss selectors, over-fetch on GPU, exact scans on HNSW
    entries.py       the catalog's entries an index serves: uris, metadata filters, image sources
    topk.py          the one merge of partial top-k results, exclusion, faiss's padding
    index_store.py   the index directory's format on disk; placement.py: GPU or CPU
"""

from cirflow.indexing.search.entries import ImageSource, SearchError, UnknownFieldError, UnknownIdError
from cirflow.indexing.search.searcher import IndexMismatchError, Searcher
from cirflow.indexing.search.sharded import ShardedIndex, load_index
from cirflow.indexing.search.vector_index import SearchResult, VectorIndex

__all__ = ["ImageSource", "IndexMismatchError", "SearchError", "SearchResult", "Searcher", "ShardedIndex",
           "UnknownFieldError", "UnknownIdError", "VectorIndex", "load_index"]
