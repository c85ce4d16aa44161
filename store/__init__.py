"""Bytes on disk and in memory for chunk KVs: keys, format, LMDB store and hot tiers."""

from store.hashing import chunk_hash
from store.hot import HotTier
from store.lmdb_store import KVStore
from store.reader import StagedReader
from store.serialize import CorruptEntry, FingerprintMismatch, decode_kv, encode_kv

__all__ = ["chunk_hash", "encode_kv", "decode_kv", "CorruptEntry", "FingerprintMismatch",
           "KVStore", "HotTier", "StagedReader"]
