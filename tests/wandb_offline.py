"""What an offline W&B run recorded: the records of its `run-<id>.wandb` file, which `wandb sync` uploads.

wandb ships no reader for this file any more (its core is in Go); the format is LevelDB's log: a
7-byte file header, then 32 KiB blocks of chunks (crc32, length, type), each record a protobuf.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def config(path: Path) -> dict:
    """The run's config as the records set it, each top-level key's latest value."""
    out = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        out.update({item.key: json.loads(item.value_json) for item in items})
    return out


def artifacts(path: Path) -> list:
    return [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"]
