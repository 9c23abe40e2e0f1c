"""Storage layer (fsspec): input shards by byte range, atomic commit of output parts, the manifest.

Works with any fsspec URL (local paths, file://, s3://, ...); see storage.py for passing credentials and
endpoints, schema.py for the Parquet schemas, parts.py for the output directory (OutputDir: its names and the
commit protocol), markers.py for what a commit leaves there (its marker, its parts, their names), claims.py for
claiming an output directory for one job (atomic, never inside or around another job's output). The URL
functions (stage_shard, committed_shards, ...) are OutputDir's methods for callers that hold a URL.
"""
from .inputs import expand_inputs, index_inputs, read_shard, shard_refs
from .manifest import (manifest_part_urls, manifest_shards, output_owner, parts_not_there, read_manifest,
                       read_parts, set_output_owner, verify_output, write_manifest)
from .markers import CommitError, CommitMarker, PartInfo, StagedPart, new_attempt
from .parts import (OutputDir, clear_staging, committed_shards, discard_staged, part_path, promote_shard,
                    read_marker, stage_shard)
from .schema import KINDS, parquet_schema
from .storage import absolute_url, join_url, normalize_url, open_output_fs, url_to_fs

__all__ = [
    "expand_inputs", "index_inputs", "read_shard", "shard_refs",
    "OutputDir", "stage_shard", "promote_shard", "discard_staged", "new_attempt", "clear_staging", "committed_shards",
    "read_marker",
    "part_path", "StagedPart", "CommitMarker", "PartInfo", "CommitError",
    "write_manifest", "read_manifest", "read_parts", "manifest_part_urls", "verify_output", "manifest_shards",
    "parts_not_there",
    "output_owner", "set_output_owner",
    "KINDS", "parquet_schema", "open_output_fs", "url_to_fs", "join_url", "normalize_url", "absolute_url",
]
