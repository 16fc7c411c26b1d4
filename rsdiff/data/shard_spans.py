"""Where each sample lies in a shard, so a few samples can be read without reading the shard.

:func:`shard_spans` reads a shard once (decoding nothing) and returns each sample key's byte span;
:func:`read_spans` then fetches only the asked samples' bytes (ranged GETs on S3, seeks on local
disk), neighbouring spans merged into one read, and decodes them. Memory and bytes read follow the
samples asked for, not the shard (shards are up to 256 MB; a draw may want a handful from each).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

from webdataset.tariterators import base_plus_ext

from rsdiff import storage
from rsdiff.data.shards import Sample, decode_sample
from rsdiff.errors import DataError

BLOCK = 512  # tar's block size: members start on block boundaries
MERGE_GAP = 1 << 18  # bytes between two wanted spans below which one read fetches both


def shard_spans(uri: str) -> dict[str, tuple[int, int]]:
    """``{key: (start, end)}``: each sample's bytes, from its first member's header to the end of
    its last member's (block-padded) data, in one streaming pass over the shard.

    Raises:
        DataError: the shard is not a readable tar (truncated, corrupt).
    """
    spans: dict[str, tuple[int, int]] = {}
    stream = storage.open_stream(uri)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                key, _ = base_plus_ext(info.name)
                if info.isreg() and key is not None:
                    end = info.offset_data + -(-info.size // BLOCK) * BLOCK
                    spans[key] = (spans.get(key, (info.offset, end))[0], end)
                tar.members = []  # the stream mode keeps every header otherwise
    except tarfile.TarError as exc:
        raise DataError(f"shard {storage.display(uri)} is not a readable tar ({exc}); re-ingest it") from None
    finally:
        stream.close()
    return spans


def merged_reads(spans: list[tuple[int, int]], gap: int = MERGE_GAP) -> list[tuple[int, int]]:
    """``spans`` (sorted, disjoint) merged where they lie less than ``gap`` bytes apart."""
    reads: list[tuple[int, int]] = []
    for start, end in spans:
        if reads and start - reads[-1][1] < gap:
            reads[-1] = (reads[-1][0], max(end, reads[-1][1]))
        else:
            reads.append((start, end))
    return reads


def read_spans(uri: str, spans: dict[str, tuple[int, int]]) -> Iterator[Sample]:
    """The samples ``spans`` names (``{key: (start, end)}`` from :func:`shard_spans`), decoded,
    reading only their bytes (and gaps under :data:`MERGE_GAP` between them).

    Raises:
        DataError: the bytes there no longer hold those samples (the shard changed since indexed).
    """
    found: set[str] = set()
    for start, end in merged_reads(sorted(set(spans.values()))):
        raw: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(storage.read_range(uri, start, end)), mode="r|") as tar:
                for info in tar:
                    key, ext = base_plus_ext(info.name)
                    if info.isreg() and key in spans and ext:
                        member = tar.extractfile(info)
                        raw.setdefault(key, {"__key__": key})[ext] = member.read() if member else b""
        except tarfile.TarError as exc:  # a shorter object fails in read_range, naming it
            raise DataError(f"{storage.display(uri)} changed since it was indexed ({exc})") from None
        found |= raw.keys()
        yield from (decode_sample(sample) for sample in raw.values())
    if missing := spans.keys() - found:
        raise DataError(f"{storage.display(uri)} no longer holds {sorted(missing)[:3]} where it was indexed")
