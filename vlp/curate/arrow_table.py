"""One shard's embed table as an Arrow table / Parquet file: what a distributed engine (Ray Data) reads.

Columns: `shard` (its URL), `row` (the sample's position in the shard: with the file's index, the pool's
order, which breaks every tie), `key`, `caption`, `width`, `height` (int32, from the image header),
`image_hash` (hex blake2b-128 of the image bytes), `valid`, `image` and `text` (float16 L2-normalised
embeddings as fixed-size lists), `score` (float32 image-text cosine). The file's metadata names the shard.
"""
from __future__ import annotations

from pathlib import Path
import numpy as np

SHARD_META = b"vlp.shard"
SCALARS = ("key", "caption", "width", "height", "image_hash", "valid", "score")
VECTORS = ("image", "text")


def to_arrow(shard: str, arrays: dict):
    """The Arrow table of one shard's arrays (as `vlp.curate.shard_encoder.embed_shard` returns them)."""
    import pyarrow as pa

    n = len(arrays["key"])
    cols = {"shard": pa.array([shard] * n, pa.string()), "row": pa.array(np.arange(n, dtype=np.int32))}
    for name in SCALARS:
        v = arrays[name]
        cols[name] = pa.array(v.tolist() if v.dtype.kind == "U" else v)
    for name in VECTORS:
        v = np.ascontiguousarray(arrays[name], dtype=np.float16)
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
    return pa.table(cols).replace_schema_metadata({SHARD_META: shard.encode()})


def vectors(column) -> np.ndarray:
    """[N, D] float16 of a fixed-size-list column (chunked or not)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def from_arrow(table) -> dict:
    """The numpy arrays of one shard's table (the layout `vlp.curate.store.read_table` returns)."""
    out = {"shard": np.array(table.schema.metadata[SHARD_META].decode())}
    for name in SCALARS:
        v = table.column(name).to_numpy(zero_copy_only=False)
        out[name] = v.astype(str) if name in ("key", "caption", "image_hash") else v
    for name in VECTORS:
        out[name] = vectors(table.column(name))
    return out


def write_parquet(f, shard: str, arrays: dict) -> None:
    import pyarrow.parquet as pq

    pq.write_table(to_arrow(shard, arrays), f)


def read_parquet(path: Path) -> dict:
    import pyarrow.parquet as pq

    return from_arrow(pq.read_table(path))

