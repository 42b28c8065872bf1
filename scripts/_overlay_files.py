"""What the change consists of, and how to apply its edits to upstream files.

Shared by ``scripts/overlay`` (lays the change onto an installed torch) and
``scripts/series`` (exports it as a ``git am``-able patch series), so both read
the same single source of truth:

* ``torch_overlay/``: new files, at their upstream paths.
* ``patches/edits/<upstream path>.diff``: unified diffs (``a/``, ``b/``
  prefixes) of existing upstream files against the pinned base, v2.13.0.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERLAY_DIR = REPO / "torch_overlay"
EDITS_DIR = REPO / "patches" / "edits"
# torch releases whose distributed_c10d.py / _functional_collectives.py the
# edits apply to; anything else is refused rather than half-patched.
SUPPORTED_TORCH = ("2.13",)


class PatchError(Exception):
    """An edit does not apply; the message names the file and the hunk."""


@dataclass(frozen=True)
class Overlay:
    """The change: new files and edits, keyed by upstream path."""

    new_files: dict[str, bytes]
    edits: dict[str, bytes]

    @classmethod
    def load(cls) -> Overlay:
        new_files = {
            p.relative_to(OVERLAY_DIR).as_posix(): p.read_bytes()
            for p in sorted(OVERLAY_DIR.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        }
        edits = {
            p.relative_to(EDITS_DIR).as_posix().removesuffix(".diff"): p.read_bytes()
            for p in sorted(EDITS_DIR.rglob("*.diff"))
        }
        return cls(new_files, edits)

    def package_files(self) -> dict[str, bytes]:
        """New files that belong in an installed torch (not upstream's test/, docs/)."""
        return {k: v for k, v in self.new_files.items() if k.startswith("torch/")}

    def digest(self) -> str:
        h = hashlib.sha256()
        for kind, files in (("new", self.new_files), ("edit", self.edits)):
            for path, data in sorted(files.items()):
                h.update(f"{kind}\0{path}\0{len(data)}\0".encode())
                h.update(data)
        return h.hexdigest()


def apply_edit(path: str, original: bytes, diff: bytes) -> bytes:
    """Return ``original`` with ``diff`` applied, or raise PatchError.

    Uses GNU patch without fuzz: context must match exactly (offsets are fine),
    so a changed upstream line is reported instead of being patched blindly.
    """
    with tempfile.TemporaryDirectory(prefix="tdt-patch-") as tmp:
        src, out = Path(tmp) / "original", Path(tmp) / "patched"
        src.write_bytes(original)
        proc = subprocess.run(
            ["patch", "--fuzz=0", "--force", "-p1", "--reject-file=-",
             "--no-backup-if-mismatch", "-o", str(out), str(src)],
            input=diff,
            capture_output=True,
        )
        if proc.returncode != 0:
            detail = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            headers = [line for line in diff.decode().splitlines() if line.startswith("@@")]
            failed = []
            for match in re.finditer(r"Hunk #(\d+) FAILED at (\d+)", detail):
                number = int(match.group(1))
                failed.append(f"{match.group(0)}: {headers[number - 1]}")
            raise PatchError(f"{path}: " + ("; ".join(failed) or detail or "patch failed"))
        return out.read_bytes()
