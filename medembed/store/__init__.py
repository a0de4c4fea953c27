"""The HDF5 embedding store: `schema` (what a store is, the fingerprint, provenance, errors), `wal` (the
write-ahead log), `segments` (the segmented layout and its checks), `reader`, `writer` (crash-safe append,
folds, consolidation) and `merge`. Import from here: `from medembed.store import open_store, StoreWriter`."""

from medembed.store.merge import merge_stores
from medembed.store.reader import (
    EmbeddingStore,
    EmbeddingTable,
    describe_preprocess,
    format_summary,
    level_tokens,
    open_store,
    read_stores,
)
from medembed.store.schema import (
    FINGERPRINT_KEYS,
    ProvenanceWarning,
    StoreError,
    StoreWarning,
    collect_provenance,
    fingerprint_mismatch,
    make_fingerprint,
    text_problem,
)
from medembed.store.writer import StoreWriter, consolidate_store

__all__ = [
    "FINGERPRINT_KEYS", "EmbeddingStore", "EmbeddingTable", "ProvenanceWarning", "StoreError", "StoreWarning", "StoreWriter",
    "collect_provenance", "consolidate_store", "describe_preprocess", "fingerprint_mismatch", "format_summary",
    "level_tokens", "make_fingerprint", "merge_stores", "open_store", "read_stores", "text_problem",
]
