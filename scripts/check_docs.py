#!/usr/bin/env python3
"""Build the docs page with Sphinx (MyST + autodoc + napoleon), warnings as errors.

    python scripts/check_docs.py        # with an interpreter whose torch has the overlay

PyTorch's full docs build needs its theme and the whole tree; this builds the
new page alone, in a throwaway project whose index links it, which is enough
to catch broken MyST, bad autodoc targets and malformed docstrings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "torch_overlay/docs/source/distributed.threading.md"
CONF = """\
project = "torch.distributed.threading"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
myst_enable_extensions = ["colon_fence"]
source_suffix = {".md": "markdown"}
napoleon_google_docstring = True
"""
INDEX = """\
# Docs check

```{toctree}
distributed.threading
```
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "source", Path(tmp) / "html"
        src.mkdir()
        (src / "conf.py").write_text(CONF)
        (src / "index.md").write_text(INDEX)
        shutil.copy(PAGE, src / PAGE.name)
        proc = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
             str(src), str(out)]
        )
        if proc.returncode == 0:
            print(f"docs: {PAGE.name} builds without warnings")
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
