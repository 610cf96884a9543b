"""Where signal parts live: a local folder, or an fsspec URL (``s3://bucket/prefix``) that workers on
other machines share.

A local root keeps the local guarantees as they are (temporary name, fsync, rename). On an object
store there is no rename; a part is one PUT, which the store makes visible whole or not at all, so a
killed writer leaves no torn part there either. Credentials and the endpoint come from the usual
places of the filesystem's library (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, or ``~/.aws``), never from our settings or files.

DuckDB's own S3 support is its ``httpfs`` extension, which it downloads on first use; offline it
cannot. :func:`duckdb_connection` registers the same fsspec filesystem with DuckDB instead, so SQL
over ``read_parquet('s3://...')`` works wherever the store itself works.
"""

from __future__ import annotations

import errno
from typing import Any

import duckdb


class StoreFull(OSError):
    """The filesystem under the store ran out of space while a file was being written: the file was
    removed (no torn file), every part before it is kept, and a run after space returns resumes."""


def no_space(e: BaseException, folder: Any, what: str) -> StoreFull | None:
    """The clear error for a full disk (``ENOSPC``, ``EDQUOT``) while writing ``what`` in ``folder``."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(e.errno, f"no space left in {folder} while writing {what}; the parts before it are kept "
                                  "and nothing is torn: free space and run again to resume")
    return None


def is_url(root: str) -> bool:
    """Whether ``root`` names a remote filesystem (``s3://``, ``gs://``, ``memory://``...) rather than a folder."""
    return "://" in root and not root.startswith("file://")


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it (``bucket/prefix`` for S3). Listings are
    never cached: parts written by other processes must be seen at once."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options = {"use_listings_cache": False} if protocol in ("s3", "s3a") else {}
    return fsspec.core.url_to_fs(url, **options)


def duckdb_connection(url: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that reads ``url``'s files (``read_parquet('s3://...')``)."""
    con = duckdb.connect()
    if is_url(url):
        fs, _ = filesystem(url)
        con.register_filesystem(fs)
    return con
