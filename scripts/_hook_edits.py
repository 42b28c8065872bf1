"""The edits of upstream files, generated: the collective hook lines.

The change to ``distributed_c10d.py`` and ``_functional_collectives.py`` is
mechanical: define ``_collective_hook`` and, in each collective entry point,
right after its ``__torch_function__`` check (else after its docstring),

    if (
        not torch.compiler.is_dynamo_compiling()
        and (hook := _collective_hook.fn) is not None
    ):
        return hook(<entry point>, <param>=<param>, ...)

Dynamo never reads the hook (``is_dynamo_compiling()`` is False when not
tracing), so a function traced on a thread with a hook gets the same graph
and guards as on any other thread; compiled code reaches the hook's owner
through the functional collective ops it calls.

DDP calls two C++ collectives from Python (``dist._broadcast_coalesced``,
``dist._verify_params_across_processes``). Both go through one function of
``torch/distributed/utils.py`` each, which gets the same hook lines; the
two other callers of ``_broadcast_coalesced`` (DDP's delayed all-reduce
setup, ``_state_dict_utils``) are made to call that function instead.

An edit consists of *steps* (``STEPS``), applied in order; the series puts
some steps of one file in different patches (``split_group``'s rename comes
before the hook). The edits are generated from each release's own source
(its parameters, overloads and helper names differ between releases) rather
than kept as hand-made diffs. ``scripts/series export`` writes the result as
``patches/edits/<X.Y>/*.diff``.

Compiled code and the backward of functional collectives call the functional
collective ops (``torch.ops._c10d_functional.*``) without passing any Python
entry point. ``torch/_ops.py`` gets the op-level counterpart of the hook: the
``OpOverload`` and ``OpOverloadPacket`` objects of a fixed set of collective
ops are made of two small subclasses whose ``__call__`` consults a per-thread
``_collective_op_hook``; every other op is the object it was. Inductor's
``_CollectiveKernel`` asserted the exact type ``OpOverload``, and accepts a
subclass instead (``torch/_inductor/ir.py``).
"""

from __future__ import annotations

import ast
import re

C10D = "torch/distributed/distributed_c10d.py"
FUNCOL = "torch/distributed/_functional_collectives.py"
UTILS = "torch/distributed/utils.py"
DDP = "torch/nn/parallel/distributed.py"
STATE_DICT_UTILS = "torch/distributed/_state_dict_utils.py"
OPS = "torch/_ops.py"
INDUCTOR_IR = "torch/_inductor/ir.py"

# Each edited file's steps, in the order they are applied.
STEPS: dict[str, tuple[str, ...]] = {
    C10D: ("split_group", "hook"),
    FUNCOL: ("hook",),
    UTILS: ("hook",),
    DDP: ("reroute",),
    STATE_DICT_UTILS: ("reroute",),
    OPS: ("collective_ops",),
    INDUCTOR_IR: ("collective_ops",),
}

# Entry points, by the name the current release uses. A name in ALIASES is
# hooked under its older name where the newer one does not exist yet (and
# left alone where the newer one exists, which it then merely calls).
_C10D_ENTRY_POINTS = (
    "broadcast", "all_reduce", "all_reduce_coalesced", "reduce", "all_gather",
    "all_gather_single", "all_gather_coalesced", "gather", "gather_single", "scatter",
    "reduce_scatter", "reduce_scatter_single", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
    "send_object_list", "recv_object_list", "new_group", "new_subgroups", "split_group",
    # Not a collective, but process-wide state that collectives of every thread
    # consult: a hook's owner may refuse it.
    "_coalescing_manager",
)
_FUNCOL_ENTRY_POINTS = (
    "broadcast", "all_reduce", "all_gather_single", "reduce_scatter_single",
    "all_reduce_coalesced", "all_gather_single_coalesced",
    "reduce_scatter_single_coalesced", "all_to_all_single",
)
# The Python functions through which DDP reaches its C++ collectives.
_UTILS_ENTRY_POINTS = ("_verify_param_shape_across_processes", "_sync_params_and_buffers")
_CPP_BROADCAST = "dist._broadcast_coalesced"
_ALIASES: dict[str, dict[str, str]] = {
    UTILS: {},
    C10D: {
        "all_gather_single": "all_gather_into_tensor",
        "reduce_scatter_single": "reduce_scatter_tensor",
    },
    FUNCOL: {
        "all_gather_single": "all_gather_tensor",
        "reduce_scatter_single": "reduce_scatter_tensor",
        "all_gather_single_coalesced": "all_gather_into_tensor_coalesced",
        "reduce_scatter_single_coalesced": "reduce_scatter_tensor_coalesced",
    },
}

_HOOK_CLASS = '''

class _CollectiveHook(threading.local):
    """Per-thread redirection of this module's collective entry points.

    While ``fn`` is set on a thread, each collective entry point calls
    ``fn(entry_point, **arguments)`` right after its ``__torch_function__``
    check and returns what it returns. ``torch.distributed.threading`` sets it
    on its worker threads so that one coordinating thread issues their
    collectives in an order that is identical on every rank. Every other
    thread sees the class default, ``None``: one attribute lookup, no other cost.

    Dynamo never reads ``fn`` (the check of ``is_dynamo_compiling()`` comes
    first), so a graph traced on a thread with a hook is the graph traced on
    any other thread. Compiled code calls functional collective ops, which a
    hook's owner can intercept when they run.
    """

    fn: Callable[..., Any] | None = None


_collective_hook = _CollectiveHook()'''


# The ops that issue a collective or a point-to-point transfer.
COLLECTIVE_OPS = (
    "_c10d_functional::all_gather_into_tensor",
    "_c10d_functional::all_gather_into_tensor_coalesced",
    "_c10d_functional::all_gather_into_tensor_out",
    "_c10d_functional::all_reduce",
    "_c10d_functional::all_reduce_",
    "_c10d_functional::all_reduce_coalesced",
    "_c10d_functional::all_reduce_coalesced_",
    "_c10d_functional::all_to_all_single",
    "_c10d_functional::batch_p2p_ops",
    "_c10d_functional::broadcast",
    "_c10d_functional::broadcast_",
    "_c10d_functional::irecv",
    "_c10d_functional::isend",
    "_c10d_functional::reduce_scatter_tensor",
    "_c10d_functional::reduce_scatter_tensor_coalesced",
    "_c10d_functional::reduce_scatter_tensor_out",
    "_c10d_functional_autograd::all_gather_into_tensor",
    "_c10d_functional_autograd::all_to_all_single",
    "_c10d_functional_autograd::reduce_scatter_tensor",
    "_dtensor::shard_dim_alltoall",
)

_OP_HOOK_CLASSES = '''class _CollectiveOpHook(threading.local):
    """Per-thread redirection of the ops that issue a collective.

    While ``fn`` is set on a thread, calling one of ``_COLLECTIVE_OPS`` there,
    through its ``OpOverload`` or its ``OpOverloadPacket``, calls
    ``fn(op, args, kwargs)`` instead and returns what it returns. It is the
    op-level counterpart of ``distributed_c10d``'s collective hook: compiled
    code (AOTAutograd graphs, inductor's Python wrapper) and the backward of
    functional collectives call these ops without passing a Python entry
    point. ``torch.distributed.threading`` sets both hooks on its worker
    threads. Every other thread sees the class default, ``None``, and every
    other op is an ``OpOverload`` as before.
    """

    fn: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any] | None = None


_collective_op_hook = _CollectiveOpHook()

# The ops that issue a collective or a point-to-point transfer. A fixed set
# rather than whole namespaces: those also hold ops that only wait or wrap
# (wait_tensor, _wrap_tensor_autograd), and which of them are registered
# depends on what a process imported, which must not change what one rank
# hands to its hook.
_COLLECTIVE_OPS = frozenset(
    {
COLLECTIVE_OP_NAMES    }
)


class _CollectiveOpOverload(OpOverload[_P, _T]):
    """An overload of one of ``_COLLECTIVE_OPS``: see ``_CollectiveOpHook``."""

    def __call__(self, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if (hook := _collective_op_hook.fn) is not None:
            return hook(self, args, kwargs)
        return super().__call__(*args, **kwargs)


class _CollectiveOpOverloadPacket(OpOverloadPacket[_P, _T]):
    """The packet of one of ``_COLLECTIVE_OPS``: see ``_CollectiveOpHook``."""

    _overload_type = _CollectiveOpOverload

    def __call__(self, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if (hook := _collective_op_hook.fn) is not None:
            return hook(self, args, kwargs)
        return super().__call__(*args, **kwargs)


'''.replace(
    "COLLECTIVE_OP_NAMES", "".join(f'        "{name}",\n' for name in COLLECTIVE_OPS)
)


def _replace_once(path: str, source: str, old: str, new: str) -> str:
    if source.count(old) != 1:
        raise EditError(f"{path}: {source.count(old)} times {old!r}, expected once")
    return source.replace(old, new)


def _hook_collective_ops(path: str, source: str) -> str:
    """The collective ops' subclasses in ``_ops.py``; an isinstance in ``ir.py``."""
    if path == INDUCTOR_IR:
        for negated in ("", "not "):
            old = f"type(self.op_overload) is {negated}torch._ops.OpOverload"
            if old in source:
                prefix = "not " if negated else ""
                return _replace_once(
                    path, source, old,
                    f"{prefix}isinstance(self.op_overload, torch._ops.OpOverload)")
        raise EditError(f"{path}: no exact-type check of OpOverload to relax")
    source = _replace_once(path, source, "\nimport sys\n", "\nimport sys\nimport threading\n")
    source = _replace_once(
        path, source,
        '    __file__: ClassVar[str] = "torch.ops"\n\n    def __init__(\n        self,\n'
        "        qualified_op_name",
        '    __file__: ClassVar[str] = "torch.ops"\n'
        "    # The type of its overloads (a subclass's may differ).\n"
        "    _overload_type: ClassVar[type[OpOverload]] = OpOverload\n\n"
        "    def __init__(\n        self,\n        qualified_op_name",
    )
    source = _replace_once(
        path, source,
        "                OpOverload(self, op_, op_dk_, schema, tags)\n",
        "                self._overload_type(self, op_, op_dk_, schema, tags)\n",
    )
    source = _replace_once(
        path, source,
        "        opoverloadpacket = OpOverloadPacket(\n"
        "            qualified_op_name, op_name, op, overload_names\n"
        "        )\n",
        "        packet_type = (\n"
        "            _CollectiveOpOverloadPacket\n"
        "            if qualified_op_name in _COLLECTIVE_OPS\n"
        "            else OpOverloadPacket\n"
        "        )\n"
        "        opoverloadpacket = packet_type(qualified_op_name, op_name, op, overload_names)\n",
    )
    anchor = "# Note - this mirrors the logic of the cpp_function defined in jit/python/init.cpp\n"
    return _replace_once(path, source, anchor, _OP_HOOK_CLASSES + anchor)


class EditError(Exception):
    """The source does not have the shape the generator relies on."""


def _definitions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Module-level functions by name; the implementation, not ``@overload`` stubs."""
    found: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            decorators = {ast.unparse(d) for d in node.decorator_list}
            if not decorators & {"overload", "typing.overload"}:
                found[node.name] = node
    return found


def _hooked(path: str, functions: dict[str, ast.FunctionDef]) -> list[ast.FunctionDef]:
    names = {C10D: _C10D_ENTRY_POINTS, FUNCOL: _FUNCOL_ENTRY_POINTS}.get(
        path, _UTILS_ENTRY_POINTS
    )
    chosen = []
    for name in names:
        if name not in functions:
            name = _ALIASES[path].get(name, name)
        if name in functions:
            chosen.append(functions[name])
    return chosen


def _hook_lines(fn: ast.FunctionDef, indent: str, hook: str) -> list[str]:
    a = fn.args
    if a.vararg or a.kwarg or a.posonlyargs:
        raise EditError(f"{fn.name}: *args, **kwargs or positional-only parameters")
    if any(isinstance(n, ast.Name) and n.id == "hook" for n in ast.walk(fn)):
        raise EditError(f"{fn.name} already uses the name 'hook'")
    names = [p.arg for p in a.args + a.kwonlyargs]
    head = "\n".join([
        f"{indent}if (",
        f"{indent}    not torch.compiler.is_dynamo_compiling()",
        f"{indent}    and (hook := {hook}) is not None",
        f"{indent}):",
    ])
    one = f"{indent}    return hook({fn.name}, " + ", ".join(f"{n}={n}" for n in names) + ")"
    if len(one) <= 88:
        return [head, one]
    return [head, f"{indent}    return hook(", f"{indent}        {fn.name},"] + [
        f"{indent}        {n}={n}," for n in names
    ] + [f"{indent}    )"]


def _insertion(fn: ast.FunctionDef) -> tuple[int, bool]:
    """(line after which to insert, whether that line ends a __torch_function__ block)."""
    for stmt in fn.body:
        if isinstance(stmt, ast.If) and "has_torch_function" in ast.unparse(stmt.test):
            return stmt.end_lineno or stmt.lineno, True
    first = fn.body[0]
    is_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return (first.end_lineno or first.lineno) if is_docstring else fn.body[0].lineno - 1, False


def _rename_shadowing_loop_variable(lines: list[str], fn: ast.FunctionDef) -> None:
    # split_group's loop variable is named split_group, which would make the
    # hook line's reference to the function a reference to an unbound local.
    for node in ast.walk(fn):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) \
                and node.target.id == fn.name:
            for i in range(node.lineno - 1, node.end_lineno or node.lineno):
                lines[i] = re.sub(rf"(?<![.\w]){fn.name}\b", "split", lines[i])


def _ensure_imports(lines: list[str], tree: ast.Module, path: str) -> None:
    """Edits top-level imports in place; call after the function edits (line numbers)."""
    if path == FUNCOL:
        anchor = "from torch.distributed.device_mesh import DeviceMesh"
        if anchor not in lines:
            raise EditError(f"{path}: no line {anchor!r}")
        lines.insert(lines.index(anchor) + 1,
                     "from torch.distributed.distributed_c10d import _collective_hook")
        return
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node).startswith("GroupName = NewType"):
            lines.insert(node.end_lineno or node.lineno, _HOOK_CLASS)
            break
    else:
        raise EditError(f"{path}: no 'GroupName = NewType(...)' line to put the hook after")
    typing = next((n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "typing"),
                  None)
    if typing is None:
        raise EditError(f"{path}: no 'from typing import' line")
    if "Any" not in {alias.name for alias in typing.names}:
        i = typing.lineno - 1
        if typing.end_lineno == typing.lineno:
            lines[i] = lines[i].replace("from typing import ", "from typing import Any, ", 1)
        else:  # one name per line, sorted case-insensitively: Any goes first
            lines.insert(i + 1, "    Any,")
    if "import threading" not in lines:
        if "import sys" not in lines:
            raise EditError(f"{path}: no 'import sys' line to put 'import threading' after")
        lines.insert(lines.index("import sys") + 1, "import threading")


def _add_hooks(path: str, source: str) -> str:
    tree = ast.parse(source)
    lines = source.splitlines()
    # utils.py is imported where torch.distributed may be unavailable: it
    # reaches the hook through the module at call time.
    hook = "dist.distributed_c10d._collective_hook.fn" if path == UTILS else "_collective_hook.fn"
    inserts = []
    for fn in _hooked(path, _definitions(tree)):
        after, after_torch_function = _insertion(fn)
        new = _hook_lines(fn, " " * (fn.body[0].col_offset), hook)
        inserts.append((after, ["", *new] if after_torch_function else [*new, ""]))
    for after, new in sorted(inserts, reverse=True):
        lines[after:after] = new
    # Imports and the hook class sit above every function: edit them last.
    if path != UTILS:
        _ensure_imports(lines, tree, path)
    return "\n".join(lines) + "\n"


def _rename_split_group(source: str) -> str:
    lines = source.splitlines()
    functions = _definitions(ast.parse(source))
    if "split_group" in functions:
        _rename_shadowing_loop_variable(lines, functions["split_group"])
    return "\n".join(lines) + "\n"


def _broadcast_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == _CPP_BROADCAST
    ]


def _reroute_broadcasts(path: str, source: str) -> str:
    """Make ``dist._broadcast_coalesced(...)`` calls ``_sync_params_and_buffers(...)``.

    Same arguments, same effect (that function only skips an empty list), and
    the call now passes the hook in ``torch/distributed/utils.py``.
    """
    tree = ast.parse(source)
    calls = _broadcast_calls(tree)
    if not calls:
        raise EditError(f"{path}: no {_CPP_BROADCAST}(...) call")
    lines = source.splitlines()
    for call in sorted(calls, key=lambda c: (c.func.lineno, c.func.col_offset), reverse=True):
        if call.func.lineno != call.func.end_lineno or call.keywords or len(call.args) != 4:
            raise EditError(f"{path}:{call.lineno}: {_CPP_BROADCAST} not called as expected")
        i, start, end = call.func.lineno - 1, call.func.col_offset, call.func.end_col_offset
        lines[i] = lines[i][:start] + "_sync_params_and_buffers" + lines[i][end:]
    if path == DDP:
        anchor = "        _sync_module_states,"
        if lines.count(anchor) != 1:
            raise EditError(f"{path}: no single line {anchor!r} to import after")
        lines.insert(lines.index(anchor) + 1, "        _sync_params_and_buffers,")
    else:
        anchor = "from torch.distributed._functional_collectives import AsyncCollectiveTensor"
        if anchor not in lines:
            raise EditError(f"{path}: no line {anchor!r}")
        lines.insert(
            lines.index(anchor) + 1, "from torch.distributed.utils import _sync_params_and_buffers"
        )
    return "\n".join(lines) + "\n"


def edit(path: str, source: str, through: str | None = None) -> str:
    """``source`` (an upstream release's ``path``) edited: every step of
    ``STEPS[path]``, or those up to and including ``through``."""
    steps = STEPS[path]
    if through is not None:
        steps = steps[: steps.index(through) + 1]
    for step in steps:
        if step == "split_group":
            source = _rename_split_group(source)
        elif step == "hook":
            source = _add_hooks(path, source)
        elif step == "collective_ops":
            source = _hook_collective_ops(path, source)
        else:
            source = _reroute_broadcasts(path, source)
    return source


def check(path: str, edited: str) -> list[str]:
    """Problems in an edited file: each hook must name its own function and pass
    exactly its parameters, and each entry point present must have one."""
    tree = ast.parse(edited)
    problems = []
    if path == INDUCTOR_IR:
        # The collective kernel must take the collective ops' subclass.
        kernel = next((n for n in tree.body
                       if isinstance(n, ast.ClassDef) and n.name == "_CollectiveKernel"), None)
        if kernel is None:
            return [f"{path}: no class _CollectiveKernel"]
        code = ast.unparse(kernel)
        if "type(self.op_overload)" in code or "isinstance(self.op_overload" not in code:
            return [f"{path}: _CollectiveKernel does not check isinstance(op, OpOverload)"]
        return []
    if path == OPS:
        classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        wanted = {"_CollectiveOpHook", "_CollectiveOpOverload", "_CollectiveOpOverloadPacket"}
        problems += [f"{path}: no class {name}" for name in sorted(wanted - classes)]
        if "OpOverload(self, op_" in edited.replace("TorchBindOpOverload(self, op_", ""):
            problems.append(f"{path}: a packet creates a plain OpOverload")
        return problems
    if path in (DDP, STATE_DICT_UTILS):
        return [f"{path}:{c.lineno}: calls {_CPP_BROADCAST}" for c in _broadcast_calls(tree)]
    functions = _definitions(tree)
    if path == UTILS:
        problems += [f"{name}: missing" for name in _UTILS_ENTRY_POINTS if name not in functions]
    for fn in _hooked(path, functions):
        calls = [
            n for n in ast.walk(fn)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hook"
        ]
        if len(calls) != 1:
            problems.append(f"{fn.name}: {len(calls)} hook calls")
            continue
        call = calls[0]
        target = call.args[0].id if call.args and isinstance(call.args[0], ast.Name) else None
        params = [p.arg for p in fn.args.args + fn.args.kwonlyargs]
        passed = [k.arg for k in call.keywords]
        if target != fn.name or passed != params:
            problems.append(f"{fn.name}: hook({target}, {passed}) != its parameters {params}")
        stores = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id == fn.name
                  and isinstance(n.ctx, ast.Store)]
        if stores:
            problems.append(f"{fn.name}: assigns its own name, shadowing the function")
    return problems
