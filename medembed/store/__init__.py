"""The HDF5 embedding store, moved from medembed/store.py into this package (split into modules next)."""

from medembed.store.writer import *  # noqa: F403
from medembed.store.writer import _RECORD_HEAD, _RECORD_MAGIC, _encode_record, _reserve  # noqa: F401
