"""Data stage: the challenge's shard format (shards), tokenizer and byte table (tokenizer), prepare (corpus),
row layouts (rows), groups of shards in memory (groups), the shard-rotating loader (loader), download."""
from .corpus import MIN_VOCAB, prepare
from .loader import ShardedLoader, check_batch_fits, read_shard_set
from .shards import DataError, check_manifest_tokens, load_split, read_manifest, read_shard, shard_paths
from .tokenizer import ByteTable, load_tokenizer

__all__ = [
    "MIN_VOCAB", "prepare", "ShardedLoader", "check_batch_fits", "read_shard_set", "DataError", "check_manifest_tokens", "load_split", "read_manifest",
    "read_shard", "shard_paths", "ByteTable", "load_tokenizer",
]
