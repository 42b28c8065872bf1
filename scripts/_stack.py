"""The tree after each patch of the series: what every prefix of the stack holds.

``patches/series.toml`` lists the patches in order. A patch brings:

* new files (``files`` entries naming a file of ``torch_overlay/``, or a folder
  ending in ``/`` for its files that no patch names), as the final tree has them;
* steps of a generated upstream edit (``"PATH"`` for all of ``_hook_edits``'
  steps of PATH, ``"PATH@STEP"`` for its steps up to STEP), or an edit of
  ``patches/by-hand/`` (static: C++ sources and docs are not in a wheel);
* definitions it adds to files that earlier patches added (``defines =
  ["PATH::name", "PATH::Class.name"]``: functions, classes, methods and
  module-level assignments, with their decorators and the comments right
  above them), such as a feature's test methods;
* a *peel* (``peel = "patches/peel/NAME.diff"``): its other changes to files
  that earlier patches added, written as the diff that removes them from the
  tree after the patch, less its ``defines``.

``torch_overlay/`` stays the one source of the code: the tree before a patch
is the tree after it, less the files and definitions it adds, with its peel
applied. A peel holds only the few integration lines of a feature, so it is
small, and it stops applying (loudly) when the code it names moves.

Only the base release's files are computed: the stack is for v2.13.0.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import _stub_edits
import _hook_edits
import _upstream_files
from _overlay_files import BASE, REPO, Overlay, PatchError, apply_edit

SERIES_TOML = REPO / "patches" / "series.toml"


@dataclass(frozen=True)
class Patch:
    number: int
    subject: str
    body: str
    new_files: tuple[str, ...]  # added by this patch
    steps: dict[str, str]  # upstream path -> the last step this patch applies
    by_hand: tuple[str, ...]  # edits of patches/by-hand/ (static diffs)
    defines: tuple[str, ...]  # "PATH::qualname" added to earlier files
    peel: Path | None
    tests: tuple[str, ...]  # this patch's own tests, run at its prefix


@dataclass(frozen=True)
class Stack:
    author: str
    date: str
    patches: list[Patch]
    # states[k]: upstream path -> text after patch k (states[0]: pristine);
    # None where a file does not exist at that point.
    states: list[dict[str, str | None]]
    by_hand_edits: dict[str, bytes]

    def overlay_at(self, k: int) -> Overlay:
        """The change as an overlay after patch ``k``, for installing a prefix."""
        full = Overlay.load(BASE)
        before = self.states[0]
        state = self.states[k]
        new_files = {p: t.encode() for p, t in state.items() if t is not None and before[p] is None}
        edits = {}
        for path, text in state.items():
            if before[path] is not None and text != before[path]:
                edits[path] = unified_diff(path, before[path], text).encode()
        # A shim stands in for a C++ edit, from the patch that makes it.
        edited = {path for p in self.patches[:k] for path in p.by_hand}
        return Overlay(new_files, edits, full.by_hand_edits, full.shims_for(edited))


def unified_diff(path: str, original: str, edited: str) -> str:
    """git's diff (function names in hunk headers), with a/ b/ headers only."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for side, text in (("a", original), ("b", edited)):
            (Path(tmp) / side / path).parent.mkdir(parents=True)
            (Path(tmp) / side / path).write_text(text)
        diff = subprocess.run(
            ["git", "diff", "--no-index", "--no-color", "--no-prefix", f"a/{path}", f"b/{path}"],
            cwd=tmp, capture_output=True, text=True,
        ).stdout
    return diff[diff.index(f"--- a/{path}"):]


def _split_peel(text: str) -> dict[str, str]:
    """A multi-file diff, by the path each part edits."""
    parts: dict[str, str] = {}
    current: list[str] | None = None
    for line in text.splitlines(keepends=True):
        if line.startswith("--- a/"):
            current = []
            path = line[len("--- a/"):].strip()
            if path in parts:
                raise _error(f"a peel edits {path} in two parts: make them one")
            parts[path] = current  # type: ignore[assignment]
        if current is not None:
            current.append(line)
    return {path: "".join(lines) for path, lines in parts.items()}


def _error(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


def load(down_to: int = 1) -> Stack:
    """The stack; with ``down_to``, the trees before that patch are left out
    (their peels are not applied), so that its own peel can be rewritten."""
    config = tomllib.loads(SERIES_TOML.read_text())
    overlay = Overlay.load(BASE)
    root = _upstream_files.pristine(_upstream_files.RELEASES[BASE])
    patches: list[Patch] = []
    owner: dict[str, str] = {}  # file or step -> subject, to catch doubles
    # A folder entry takes the files under it that no patch names one by one.
    named = {e for spec in config["patch"] for e in spec["files"] if not e.endswith("/")}
    for number, spec in enumerate(config["patch"], 1):
        new_files: list[str] = []
        steps: dict[str, str] = {}
        by_hand: list[str] = []
        for entry in spec["files"]:
            path, _, step = entry.partition("@")
            if entry.endswith("/"):
                matched = sorted(
                    p for p in overlay.new_files if p.startswith(entry) and p not in named
                )
                if not matched:
                    raise _error(f"series.toml names {entry!r}, which matches no file")
                new_files += matched
            elif path in overlay.new_files and not step:
                new_files.append(path)
            elif path in _hook_edits.STEPS:
                all_steps = _hook_edits.STEPS[path]
                if step and step not in all_steps:
                    raise _error(f"{entry!r}: {path} has the steps {all_steps}")
                steps[path] = step or all_steps[-1]
            elif path in _stub_edits.PYIS:
                steps[path] = "stubs"
            elif path in overlay.by_hand_edits:
                by_hand.append(path)
            else:
                raise _error(f"series.toml names {entry!r}, which matches no file")
        for key in new_files + [f"{p}@{s}" for p, s in steps.items()] + by_hand:
            if key in owner:
                raise _error(f"{key} is in both {owner[key]!r} and {spec['subject']!r}")
            owner[key] = spec["subject"]
        peel = REPO / spec["peel"] if "peel" in spec else None
        patches.append(Patch(number, spec["subject"], spec["body"], tuple(new_files), steps,
                             tuple(by_hand), tuple(spec.get("defines", ())), peel,
                             tuple(spec.get("tests", ()))))

    edited = [*_hook_edits.STEPS, *_stub_edits.PYIS]
    missing = (set(overlay.new_files) | set(overlay.by_hand_edits)) - set(owner)
    missing |= {p for p in edited if f"{p}@{_final_step(p)}" not in owner}
    if missing:
        raise _error(f"not in any patch of series.toml: {', '.join(sorted(missing))}")

    # Upstream files, forward: each at the last step applied so far.
    pristine = {p: (root / p).read_text() for p in edited}
    upstream_states = [dict(pristine)]
    for patch in patches:
        state = dict(upstream_states[-1])
        for path, step in patch.steps.items():
            state[path] = _edit(path, pristine[path], step)
        upstream_states.append(state)

    # New files, backward from the final tree: drop what a patch adds, peel the rest.
    final = {p: d.decode() for p, d in overlay.new_files.items()}
    new_states = [dict(final)]
    for patch in reversed(patches):
        if patch.number < down_to:
            new_states.insert(0, {})
            continue
        state = {p: t for p, t in new_states[0].items() if p not in patch.new_files}
        for name in patch.defines:
            path, _, qualname = name.partition("::")
            if path not in state:
                raise _error(f"patch {patch.number} defines {name}, in a file it does not "
                             "find before it")
            state[path] = without_definition(state[path], qualname, name)
        if patch.peel is not None:
            for path, diff in _split_peel(patch.peel.read_text()).items():
                if path not in state:
                    raise _error(f"{patch.peel.name} peels {path}, which does not exist before "
                                 f"patch {patch.number}")
                try:
                    state[path] = apply_edit(path, state[path].encode(), diff.encode()).decode()
                except PatchError as e:
                    raise _error(f"{patch.peel.relative_to(REPO)} no longer applies: {e}") from e
        new_states.insert(0, state)

    states = []
    for up, new in zip(upstream_states, new_states, strict=True):
        state: dict[str, str | None] = dict.fromkeys(final)
        state.update(new)
        state.update(up)
        states.append(state)
    return Stack(config["author"], config["date"], patches, states, overlay.by_hand_edits)


def _final_step(path: str) -> str:
    return _hook_edits.STEPS[path][-1] if path in _hook_edits.STEPS else "stubs"


def _edit(path: str, original: str, step: str) -> str:
    if path in _stub_edits.PYIS:
        return _stub_edits.edit(path, original)
    return _hook_edits.edit(path, original, through=step)


def without_definition(source: str, qualname: str, name: str) -> str:
    """``source`` without the function, class, method or assignment ``qualname``."""
    body: list[ast.stmt] = ast.parse(source).body
    node: ast.stmt | None = None
    for part in qualname.split("."):
        node = next((n for n in body if _defines(n, part)), None)
        if node is None:
            raise _error(f"{name}: no such definition")
        body = getattr(node, "body", [])
    assert node is not None
    lines = source.splitlines(keepends=True)
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
    last = node.end_lineno or node.lineno
    indent = _indent(lines[first])
    # Comments after its last statement, indented into its body, go with it.
    j = last
    while j < len(lines) and (not lines[j].strip() or lines[j].lstrip().startswith("#")):
        if lines[j].strip() and _indent(lines[j]) <= indent:
            break
        j += 1
        if lines[j - 1].strip():
            last = j
    # So do the comments right above it, at its indent (not a pragma that
    # closes something before it, such as "# fmt: on").
    while (
        first > 0
        and lines[first - 1].startswith(" " * indent + "#")
        and not lines[first - 1].lstrip().startswith(("# fmt:", "# type:", "# noqa"))
    ):
        first -= 1
    if first > 0 and not lines[first - 1].strip():
        while first > 0 and not lines[first - 1].strip():
            first -= 1  # the gap before it
    elif first == 0 or lines[first - 1].rstrip().endswith(":"):
        # first in its block: the gap after it, if a sibling follows
        k = last
        while k < len(lines) and not lines[k].strip():
            k += 1
        if k < len(lines) and _indent(lines[k]) == indent:
            last = k
    return "".join(lines[:first] + lines[last:])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False
