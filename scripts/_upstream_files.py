"""Pristine upstream files of each supported torch release, fetched and cached.

Only the Python files the change edits (and ``torch/version.py``) are needed,
so they are read straight out of the release's wheel on the package index with
HTTP range requests (a zip keeps its directory at the end): a few hundred KB
per release instead of a 500 MB download, and nothing is installed. They are
cached under ``$TDT_CACHE/upstream/<version>/``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

# The release whose files each supported minor version's edits are made from.
RELEASES = {
    "2.11": "2.11.0",
    "2.12": "2.12.1",
    "2.13": "2.13.0",
    "2.14": "2.14.1",
    "2.15": "2.15.0",
}
FILES = (
    "torch/distributed/distributed_c10d.py",
    "torch/distributed/_functional_collectives.py",
    "torch/distributed/utils.py",
    "torch/distributed/_state_dict_utils.py",
    "torch/nn/parallel/distributed.py",
    "torch/_ops.py",
    "torch/_inductor/ir.py",
    "torch/_C/_autograd.pyi",
    "torch/_C/_distributed_c10d.pyi",
    "torch/version.py",
)
CACHE = Path(
    os.environ.get("TDT_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch-dist-threading"
)


class _RangeReader(io.RawIOBase):
    """A read-only, seekable view of a remote file, one range request per read."""

    def __init__(self, url: str) -> None:
        self._url = url
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self._size = int(r.headers["Content-Length"])
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        end = min(self._pos + len(buffer), self._size)
        if end <= self._pos:
            return 0
        byte_range = f"bytes={self._pos}-{end - 1}"
        request = urllib.request.Request(self._url, headers={"Range": byte_range})
        with urllib.request.urlopen(request, timeout=120) as r:
            data = r.read()
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _index_url() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True)
    return (out.stdout.strip() if out.returncode == 0 and out.stdout.strip()
            else "https://pypi.org/simple").rstrip("/")


def _wheel_url(version: str) -> str:
    """A Linux x86_64 wheel of torch ``version`` on the configured index (PEP 691 JSON)."""
    request = urllib.request.Request(
        f"{_index_url()}/torch/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    pattern = re.compile(rf"^torch-{re.escape(version)}-cp3\d+-cp3\d+-manylinux[\w.]*x86_64\.whl$")
    for f in files:
        if pattern.match(f["filename"]):
            return f["url"]
    raise RuntimeError(f"no Linux x86_64 wheel of torch {version} on {_index_url()}")


def pristine(version: str) -> Path:
    """Folder holding ``FILES`` of torch ``version``, fetched on first use."""
    dest = CACHE / "upstream" / version
    if all((dest / f).is_file() for f in FILES):
        return dest
    url = _wheel_url(version)
    print(f"fetching {', '.join(FILES)} of torch {version} from its wheel", file=sys.stderr)
    with zipfile.ZipFile(io.BufferedReader(_RangeReader(url), buffer_size=1 << 20)) as wheel:
        for name in FILES:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(name))  # zipfile checks each member's CRC
    return dest
