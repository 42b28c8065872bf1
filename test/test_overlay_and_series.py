"""scripts/overlay and scripts/series, against the pristine v2.13.0 files.

The pristine files come from the torch this interpreter runs (its overlay
keeps the originals), copied into a throwaway site folder, so these tests
never touch the real installation.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import _hook_edits  # noqa: E402
import _overlay_files  # noqa: E402
import _stack  # noqa: E402
import _upstream_files  # noqa: E402

OVERLAY = [sys.executable, str(REPO / "scripts" / "overlay")]
SERIES = [sys.executable, str(REPO / "scripts" / "series")]
EDITED = list(_hook_edits.STEPS)
# The series' by-hand edits: no wheel has the files they change, so git am leaves them out.
NOT_IN_A_WHEEL = [f"--exclude={path}" for path in _overlay_files.Overlay.load().by_hand_edits]


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


def test_install_uninstall_round_trip(site, tmp_path):
    before = tree_digest(site)
    shutil.copytree(site, tmp_path / "before")
    assert run([*OVERLAY, "status", "--site", str(site)]).returncode == 1
    out = run([*OVERLAY, "install", "--site", str(site)])
    assert out.returncode == 0, out.stderr
    assert (site / "torch/distributed/threading/__init__.py").exists()
    for path in EDITED:
        assert _hook_edits.check(path, (site / path).read_text()) == []
        assert (site / path).read_text() != (tmp_path / "before" / path).read_text()
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
    out = run([*git, "am", "--keep-non-patch", *NOT_IN_A_WHEEL, *patches], cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    subjects = run(["git", "log", "--format=%s", "--reverse"], cwd=repo).stdout.splitlines()
    assert subjects[1:] == [patch.subject for patch in _stack.load().patches]
    for path in [*EDITED, "torch/_C/_autograd.pyi"]:
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


def test_the_installed_shim_gives_torch_the_series_bindings():
    # The environment the tests run in: torch/__init__.py loads the shims,
    # which attach what the C++ patches bind; the sequence number it sets
    # is the one autograd reads.
    code = (
        "import torch\n"
        "from torch._C._autograd import _get_sequence_nr, _set_sequence_nr, "
        "_set_thread_local_state, _ThreadLocalState\n"
        "_set_sequence_nr(1 << 40)\n"
        "assert _get_sequence_nr() == 1 << 40\n"
        "assert (torch.ones(1, requires_grad=True) * 2).grad_fn._sequence_nr() == 1 << 40\n"
        "_set_thread_local_state(_ThreadLocalState())\n"
        "from torch._C._distributed_c10d import _refuses_direct_collectives, "
        "_set_refuse_direct_collectives\n"
        "assert not _refuses_direct_collectives()\n"
        "_set_refuse_direct_collectives(True)\n"
        "assert _refuses_direct_collectives()\n"
    )
    out = run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr


def test_every_docs_page_of_the_series_is_in_the_table_of_contents():
    # The [docs] patch adds pages and lists them in pytorch-api.md's toctree,
    # an edit written by hand (no wheel has docs/): a page without its entry
    # fails upstream's docs build.
    toc = (REPO / "patches/by-hand/docs/source/pytorch-api.md.diff").read_text()
    listed = {line.rsplit("<", 1)[1].rstrip(">") for line in toc.splitlines()
              if line.startswith("+") and not line.startswith("+++") and "<" in line}
    pages = {p.stem for p in (REPO / "torch_overlay/docs/source").glob("*.md")}
    assert pages and pages <= listed, pages - listed


def test_the_cpp_patch_compiles_against_the_wheels_headers(tmp_path):
    # The lines the series adds to C++ sources, compiled (syntax and types
    # only) with the headers of the torch this interpreter runs: a v2.13.0
    # source tree is not at hand, so this is the check they get here.
    added = {
        path: [line[1:] for line in (REPO / "patches/by-hand" / f"{path}.diff").read_text().splitlines()
               if line.startswith("+") and not line.startswith("+++")]
        for path in ("aten/src/ATen/SequenceNumber.h", "torch/csrc/autograd/init.cpp")
    }
    declaration = "\n".join(line for line in added["aten/src/ATen/SequenceNumber.h"]
                            if not line.lstrip().startswith("//"))
    bindings = "\n".join(line for line in added["torch/csrc/autograd/init.cpp"]
                         if not line.startswith("#include"))
    source = tmp_path / "bindings.cpp"
    source.write_text(
        "#include <torch/csrc/utils/pybind.h>\n#include <ATen/SequenceNumber.h>\n"
        + "\n".join(line for line in added["torch/csrc/autograd/init.cpp"]
                    if line.startswith("#include"))
        + f"\nnamespace at::sequence_number {{\n{declaration}\n}}\n"
        + f"void bind(pybind11::module& m) {{\n{bindings}\n}}\n"
    )
    torch_dir = Path(importlib.util.find_spec("torch").submodule_search_locations[0])
    out = run(["g++", "-fsyntax-only", "-std=c++20", "-w",
               f"-I{sysconfig.get_paths()['include']}", f"-I{torch_dir / 'include'}",
               f"-I{torch_dir / 'include/torch/csrc/api/include'}", str(source)])
    assert out.returncode == 0, source.read_text() + out.stderr[-3000:]


def test_the_c10d_cpp_patch_only_adds_the_guard_and_compiles(tmp_path):
    # The c10d C++ patch: its new code (the flag, the guard, two bindings)
    # compiled with the wheel's headers, and every other line it changes is a
    # collective method's call guard, swapped for the refusing one.
    diff = (REPO / "patches/by-hand/torch/csrc/distributed/c10d/init.cpp.diff").read_text()
    removed = [line[1:] for line in diff.splitlines()
               if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    swapped = [line for line in added if "CollectiveCallGuard()" in line]
    assert len(swapped) == len(removed) > 40
    assert [line.replace("py::call_guard<py::gil_scoped_release>()", "CollectiveCallGuard()")
            for line in removed] == swapped
    new_code = [line for line in added if "CollectiveCallGuard()" not in line]
    start = next(i for i, line in enumerate(new_code) if "module.def(" in line)
    source = tmp_path / "guard.cpp"
    source.write_text(
        "#include <stdexcept>\n#include <torch/csrc/utils/pybind.h>\n"
        "namespace {\n" + "\n".join(new_code[:start]) + "\n}\n"
        "void bind(pybind11::module& module) {\n" + "\n".join(new_code[start:]) + "\n"
        "  pybind11::class_<std::string>(module, \"S\")"
        ".def(\"size\", &std::string::size, CollectiveCallGuard());\n}\n"
    )
    torch_dir = Path(importlib.util.find_spec("torch").submodule_search_locations[0])
    out = run(["g++", "-fsyntax-only", "-std=c++20", "-w",
               f"-I{sysconfig.get_paths()['include']}", f"-I{torch_dir / 'include'}",
               f"-I{torch_dir / 'include/torch/csrc/api/include'}", str(source)])
    assert out.returncode == 0, source.read_text() + out.stderr[-3000:]


def test_each_prefix_of_the_stack_installs_its_own_tree(pristine, tmp_path):
    # ``overlay install --prefix N`` (what ``series test`` runs each patch's
    # tests on) lays exactly the tree after patch N onto the release.
    stack = _stack.load()
    for patch in stack.patches:
        site = tmp_path / str(patch.number)
        shutil.copytree(pristine, site)
        (site / "torch" / "version.py").write_text("__version__ = '2.13.0+cpu'\n")
        out = run([*OVERLAY, "install", "--site", str(site), "--prefix", str(patch.number)])
        assert out.returncode == 0, out.stdout + out.stderr
        for path, text in stack.states[patch.number].items():
            if path.startswith("torch/"):
                assert (site / path).is_file() == (text is not None), (patch.number, path)
                if text is not None:
                    assert (site / path).read_text() == text, (patch.number, path)


def test_a_peel_that_no_longer_applies_is_an_error(tmp_path, monkeypatch):
    # A peel names code of the final tree; when that code moves, the stack
    # must fail loudly rather than produce a wrong earlier tree.
    peel = next(p.peel for p in _stack.load().patches if p.peel is not None)
    broken = tmp_path / peel.name
    broken.write_text(peel.read_text().replace("\n-", "\n-# moved ", 1))
    real = _stack._split_peel
    monkeypatch.setattr(_stack, "_split_peel", lambda text: real(broken.read_text()))
    with pytest.raises(SystemExit, match="no longer applies"):
        _stack.load()


def test_every_prefix_of_the_stack_passes_upstream_format_and_lint(tmp_path):
    # Each commit is reviewed, and linted upstream, on its own: the files the
    # series adds must be formatted and lint-clean at every prefix, not only
    # at the top (peels and removed definitions can leave unused imports).
    pytest.importorskip("ruff", reason="ruff is in the GIL environment only; it runs there")
    stack = _stack.load()
    config = str(REPO / "scripts" / "ruff-upstream.toml")
    for patch in stack.patches:
        root = tmp_path / str(patch.number)
        for path, text in stack.states[patch.number].items():
            if text is not None and path.endswith(".py") and stack.states[0][path] is None:
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_text(text)
        if not root.exists():
            continue
        for args in (["format", "--check"], ["check", "--output-format", "concise"]):
            out = run([sys.executable, "-m", "ruff", *args, "--config", config, str(root)])
            assert out.returncode == 0, (patch.number, patch.subject, out.stdout + out.stderr)


# Names whose attributes the package may set: its own objects (its worker
# and turn records, the items' exceptions, the wrapper coordinated() returns,
# the classes its __init__ exports) ...
_OWN_OBJECTS = frozenset({
    "self", "_this_worker", "_sections", "sections", "box", "call", "outer", "error",
    "opaque", "globals()[_name]",
})
# ... and the one attribute of torch's hooks that is their interface.
_HOOKS = frozenset({"_collective_hook", "_collective_op_hook"})


def _assigned(target: ast.expr) -> list[ast.expr]:
    """The targets an assignment writes, tuples and starred ones unpacked."""
    if isinstance(target, (ast.Tuple, ast.List)):
        return [t for element in target.elts for t in _assigned(element)]
    if isinstance(target, ast.Starred):
        return _assigned(target.value)
    return [target]


def _run_time_replacements(name: str, source: str) -> list[str]:
    """What could replace an attribute of an object the code did not create:
    setattr and delattr, writes into a __dict__ or vars(), mock, and
    assignments to attributes of anything but ``_OWN_OBJECTS`` (and ``fn``
    of ``_HOOKS``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}: "
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(
            ("setattr", "delattr", "__setattr__", "__delattr__")
        ):
            found.append(where + ast.unparse(node))
        if (isinstance(node, ast.Name) and node.id == "mock") or (
            isinstance(node, ast.Attribute) and node.attr == "mock"
        ) or (isinstance(node, ast.ImportFrom) and "mock" in ast.unparse(node)):
            found.append(where + ast.unparse(node))
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            raw = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            raw = [node.target]
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            raw = [node.optional_vars]
        else:
            continue
        for target in (t for r in raw for t in _assigned(r)):
            if isinstance(target, ast.Subscript):
                base = ast.unparse(target.value)
                if "__dict__" in base or base.startswith("vars("):
                    found.append(where + f"{ast.unparse(target)} = ...")
            if isinstance(target, ast.Attribute):
                base = ast.unparse(target.value)
                hook = base in _HOOKS and target.attr == "fn"
                if base not in _OWN_OBJECTS and not hook:
                    found.append(where + f"{ast.unparse(target)} = ...")
    return sorted(set(found))


def test_the_series_replaces_no_attribute_of_torch_at_run_time():
    # The series must not patch torch at run time (issue #21): every
    # interception point is an edit of torch's source. Checked in every
    # patch's tree, so a patch cannot add a replacement that a later one
    # removes. A syntactic check: it cannot follow an alias, so it allows
    # attribute writes only on the package's own objects, by name. The
    # overlay's shims imitate C++ edits; they are not in the series.
    stack = _stack.load()
    found = []
    for patch in stack.patches:
        for path, text in stack.states[patch.number].items():
            if (
                text is not None
                and path.startswith("torch/distributed/threading/")
                and path.endswith(".py")
            ):
                found += [
                    f"patch {patch.number}: {hit}"
                    for hit in _run_time_replacements(path, text)
                ]
    assert found == []


def test_the_replacement_check_finds_a_replacement():
    source = (
        "import torch, unittest\nfrom unittest import mock\n"
        "setattr(torch.ops.x, '_op', f)\ntorch._C.f = g\n"
        "op = torch.ops.x.default\nop._op = f\ntype(op).__dict__['a'] = 1\n"
        "delattr(op, '_op')\nunittest.mock.patch.object(op, '_op', f).start()\n"
        "a.x, (b.y, *c.z) = 1, (2, 3)\nvars(op)['_op'] = f\n_collective_hook.other = 1\n"
        "self.a = 1\n_collective_hook.fn = h\n"
    )
    assert _run_time_replacements("m.py", source) == [
        "m.py:10: a.x = ...",
        "m.py:10: b.y = ...",
        "m.py:10: c.z = ...",
        "m.py:11: vars(op)['_op'] = ...",
        "m.py:12: _collective_hook.other = ...",
        "m.py:2: from unittest import mock",
        "m.py:3: setattr(torch.ops.x, '_op', f)",
        "m.py:4: torch._C.f = ...",
        "m.py:6: op._op = ...",
        "m.py:7: type(op).__dict__['a'] = ...",
        "m.py:8: delattr(op, '_op')",
        "m.py:9: unittest.mock",
    ]


def test_a_definition_leaves_with_its_comments_and_one_gap():
    # What the stack removes for a patch's `defines`: the definition, its
    # decorators, the comments right above it and in its body, and one gap,
    # so the tree below is formatted as the tree above it.
    source = (
        'class A:\n    """Doc."""\n\n    @staticmethod\n    def m():\n        return 1\n'
        "        # about m's end\n\n    def n(self):\n        return 2\n\n\n"
        "class B:\n    def m(self):\n        return 1\n\n    def n(self):\n        return 2\n\n\n"
        "# fmt: on\n# about f\ndef f():\n    pass\n\n\nX = 1\n"
    )
    assert _stack.without_definition(source, "A.m", "A.m") == (
        'class A:\n    """Doc."""\n\n    def n(self):\n        return 2\n\n\n'
        + source[source.index("class B:"):]
    )
    assert _stack.without_definition(source, "B.m", "B.m") == source.replace(
        "class B:\n    def m(self):\n        return 1\n\n", "class B:\n"
    )
    assert _stack.without_definition(source, "f", "f") == source.replace(
        "\n# about f\ndef f():\n    pass\n", "\n"
    ).replace("# fmt: on\n\n\n\nX", "# fmt: on\n\n\nX")
    assert _stack.without_definition(source, "X", "X").endswith("def f():\n    pass\n")
    with pytest.raises(SystemExit, match="no such definition"):
        _stack.without_definition(source, "A.missing", "A.missing")
