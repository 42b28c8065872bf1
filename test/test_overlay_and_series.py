"""scripts/overlay and scripts/series, against the pristine v2.13.0 files.

The pristine files come from the torch this interpreter runs (its overlay
keeps the originals), copied into a throwaway site folder, so these tests
never touch the real installation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import _hook_edits  # noqa: E402
import _upstream_files  # noqa: E402

OVERLAY = [sys.executable, str(REPO / "scripts" / "overlay")]
SERIES = [sys.executable, str(REPO / "scripts" / "series")]
EDITED = ["torch/distributed/distributed_c10d.py", "torch/distributed/_functional_collectives.py"]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("pristine")
    out = run([*OVERLAY, "pristine", str(dest), "--python", sys.executable])
    assert out.returncode == 0, out.stderr
    return dest


@pytest.fixture()
def site(tmp_path, pristine) -> Path:
    """A minimal site folder: torch/version.py plus the two upstream files."""
    site = tmp_path / "site"
    shutil.copytree(pristine, site)
    (site / "torch" / "version.py").write_text("__version__ = '2.13.0+cpu'\n")
    return site


def test_install_uninstall_round_trip(site):
    before = tree_digest(site)
    assert run([*OVERLAY, "status", "--site", str(site)]).returncode == 1
    out = run([*OVERLAY, "install", "--site", str(site)])
    assert out.returncode == 0, out.stderr
    assert (site / "torch/distributed/threading/__init__.py").exists()
    for path in EDITED:
        assert "_collective_hook" in (site / path).read_text()
    assert run([*OVERLAY, "status", "--site", str(site)]).returncode == 0

    installed = tree_digest(site)
    again = run([*OVERLAY, "install", "--site", str(site)])
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert tree_digest(site) == installed

    # Imports leave __pycache__ behind; uninstall must clean what it created.
    (site / "torch/distributed/threading/__pycache__").mkdir()
    (site / "torch/distributed/threading/__pycache__/x.pyc").write_bytes(b"x")
    out = run([*OVERLAY, "uninstall", "--site", str(site)])
    assert out.returncode == 0, out.stderr
    assert tree_digest(site) == before
    assert not (site / "torch/distributed/threading").exists()


def test_failing_hunk_changes_nothing(site):
    target = site / "torch/distributed/distributed_c10d.py"
    # Change a context line of all_reduce's hunk, as a later upstream edit would.
    context = '    if _rank_not_in_group(group):\n        _warn_not_in_group("all_reduce")\n'
    text = target.read_text()
    assert text.count(context) == 1
    target.write_text(text.replace(context, context.replace("):", "):  # changed", 1)))
    before = tree_digest(site)
    out = run([*OVERLAY, "install", "--site", str(site)])
    assert out.returncode == 1
    assert "torch/distributed/distributed_c10d.py" in out.stderr
    assert "Hunk #" in out.stderr and "FAILED" in out.stderr
    assert "nothing was changed" in out.stderr
    assert tree_digest(site) == before


def test_unsupported_version_is_refused(site):
    (site / "torch/version.py").write_text("__version__ = '2.9.1'\n")
    before = tree_digest(site)
    out = run([*OVERLAY, "install", "--site", str(site)])
    assert out.returncode == 1 and "2.9.1" in out.stderr and "not supported" in out.stderr
    assert tree_digest(site) == before


def test_stale_overlay_is_reported_and_reinstalled(site):
    assert run([*OVERLAY, "install", "--site", str(site)]).returncode == 0
    manifest = site / "torch/.distributed-threading-overlay/manifest.json"
    manifest.write_text(manifest.read_text().replace('"overlay": "', '"overlay": "0', 1))
    status = run([*OVERLAY, "status", "--site", str(site)])
    assert status.returncode == 2 and status.stdout.startswith("stale")
    assert run([*OVERLAY, "install", "--site", str(site)]).returncode == 0
    assert run([*OVERLAY, "status", "--site", str(site)]).returncode == 0


@pytest.mark.parametrize("minor", sorted(_upstream_files.RELEASES))
def test_overlay_installs_on_every_supported_release(tmp_path, minor):
    release = _upstream_files.RELEASES[minor]
    site = tmp_path / "site"
    shutil.copytree(_upstream_files.pristine(release), site)
    before = tree_digest(site)
    out = run([*OVERLAY, "install", "--site", str(site)])
    assert out.returncode == 0, out.stderr
    for path in EDITED:
        edited = (site / path).read_text()
        assert _hook_edits.check(path, edited) == []
        compile(edited, path, "exec")
    assert run([*OVERLAY, "uninstall", "--site", str(site)]).returncode == 0
    assert tree_digest(site) == before


def test_committed_series_is_up_to_date():
    out = run([*SERIES, "check"])
    assert out.returncode == 0, out.stdout + out.stderr


def test_series_applies_with_git_am_and_equals_the_overlay(tmp_path, pristine, site):
    assert run([*OVERLAY, "install", "--site", str(site)]).returncode == 0
    repo = tmp_path / "upstream"
    shutil.copytree(pristine, repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "v2.13.0 files"]):
        assert run([*git, *args], cwd=repo).returncode == 0
    patches = sorted(str(p) for p in (REPO / "patches/series").glob("*.patch"))
    out = run([*git, "am", "--keep-non-patch", *patches], cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    subjects = run(["git", "log", "--format=%s", "--reverse"], cwd=repo).stdout.splitlines()
    assert subjects[1:] == [
        "[c10d] Add a per-thread hook in front of every collective entry point",
        "[c10d] Add torch.distributed.threading.parallel_map",
        "[docs] Document torch.distributed.threading",
    ]
    for path in EDITED:
        assert (repo / path).read_bytes() == (site / path).read_bytes(), path
    for path in (REPO / "torch_overlay").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(REPO / "torch_overlay")
            assert (repo / rel).read_bytes() == path.read_bytes(), rel


def test_installed_torch_has_the_overlay():
    # The environment the other tests run in: overlay installed and current.
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.submodule_search_locations
    out = run([*OVERLAY, "status", "--python", sys.executable])
    assert out.returncode == 0, out.stdout + out.stderr
