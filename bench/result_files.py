"""Result JSON under bench/results, plain or gzipped: files over 300 kB are kept as NAME.json.gz so that the
repository stays small enough to travel to the device machine (its limit: 64 MiB with the carried wheels)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

GZIP_OVER_BYTES = 300_000


def _gz(path: Path) -> Path:
    return path.with_name(path.name + ".gz")


def has_json(path: Path) -> bool:
    return path.exists() or _gz(path).exists()


def read_json(path: Path):
    """NAME.json, or NAME.json.gz where only that is kept."""
    path = Path(path)
    return json.loads(path.read_text() if path.exists() else gzip.decompress(_gz(path).read_bytes()))


def write_json(path: Path, data) -> Path:
    """Writes NAME.json, or NAME.json.gz (and no NAME.json) when the text is over GZIP_OVER_BYTES. Returns the file."""
    path, text = Path(path), json.dumps(data, indent=1)
    if len(text) <= GZIP_OVER_BYTES:
        _gz(path).unlink(missing_ok=True)
        path.write_text(text)
        return path
    path.unlink(missing_ok=True)
    _gz(path).write_bytes(gzip.compress(text.encode(), mtime=0))
    return _gz(path)
