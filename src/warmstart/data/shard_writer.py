"""Writing shards: one split's chunks through LitData's writer (`SplitWriter`), then warmstart.json, last and
atomically (`write_meta`). The format itself is data/shard_format.py."""

import json
import zlib
from pathlib import Path

from warmstart import fileio, untrusted
from warmstart.data import litdata_hooks
from warmstart.data.shard_format import FORMAT, META, file_digest
from warmstart.errors import UserError
from warmstart.version import __version__

DEFAULT_CHUNK_BYTES = "64MB"


class SplitWriter:
    """One split's chunks, written in the order samples are added (LitData's BinaryWriter, one process)."""

    def __init__(self, folder: Path, chunk_bytes: str = DEFAULT_CHUNK_BYTES):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.count, self.bytes = folder, 0, 0
        self.classes: dict[str, int] = {}  # images per class name
        # a fresh folder each time: LitData's writer silently writes nothing where an index.json exists
        self.writer = litdata_hooks.binary_writer(folder, chunk_bytes)

    def add(self, name: str, data: bytes, cls: str) -> None:
        data = bytes(data)
        self.writer.add_item(self.count, (data, cls, name, zlib.crc32(data)))
        self.count += 1
        self.bytes += len(data)
        self.classes[cls] = self.classes.get(cls, 0) + 1

    def close(self) -> dict:
        """Flush the last chunk, write index.json; -> this split's record for warmstart.json, each chunk hashed as
        read back from disk (what a later check compares with)."""
        if self.count == 0:
            raise UserError(f"{self.folder}: no readable images for this split; nothing to write")
        litdata_hooks.finish_writer(self.writer)
        chunks = []
        for c in untrusted.read_json(self.folder / "index.json", "index.json")["chunks"]:
            path = self.folder / c["filename"]
            chunks.append({"file": c["filename"], "samples": c["chunk_size"], "bytes": path.stat().st_size,
                           "sha256": file_digest(path)})
        return {"images": self.count, "bytes": self.bytes, "classes": dict(sorted(self.classes.items())),
                "chunks": chunks}


def write_meta(out: Path, *, classes: list[str], human: list[str] | None, splits: dict, options: dict,
               unverified: list[str], notes: list[str], checksums: list[dict] = ()) -> dict:
    """OUT/warmstart.json, written last and atomically: its presence means the shards are complete."""
    doc = {
        "format": FORMAT,
        "tool": f"warmstart {__version__}",
        "classes": classes,
        "human": human,
        "options": options,
        "verified": not unverified,
        "unverified_reasons": list(unverified),
        "checksums": list(checksums),  # the archives', as prepared.json records them
        "chunk_sha256": "SHA-256 of each chunk file, read back from disk after writing",
        "splits": splits,
        "notes": notes,
    }
    fileio.write_text(out / META, json.dumps(doc, indent=1) + "\n")
    return doc
