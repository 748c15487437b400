"""The package's shape: no import cycle, ops/ imports only torch (and triton), the
integrations stay apart, evaluation/ and correction/ never import training/, the package root
holds only its entry points and subpackages, and no import hook maps one module name to another.

The import graph is read statically with `ast`, imports inside functions included, so a cycle
that only a lazy import closes is caught too; `import a.b` counts as an edge to a.b only (not to
its parent packages, which every submodule import runs anyway)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import token_objectives

PACKAGE = "token_objectives"
ROOT = Path(token_objectives.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name -> its file."""
    found = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=f"{PACKAGE}."):
        relative = info.name.split(".")[1:]
        base = ROOT.joinpath(*relative)
        found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file, resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # `from a import b` imports the module a.b when there is one, else a's name b.
            candidates = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                          else source for alias in node.names]
        else:
            continue
        targets.update(c for c in candidates if c == PACKAGE or c.startswith(f"{PACKAGE}."))
    return targets


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (static, function-level imports included)."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_imports_and_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.ops.triton_kernels" in graph[f"{PACKAGE}.ops.statistics"]  # lazy, seen
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    script = (
        "import importlib, pkgutil, sys, traceback\n"
        f"import {PACKAGE} as package\n"
        "failed = []\n"
        "for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + '.'):\n"
        "    try:\n"
        "        importlib.import_module(info.name)\n"
        "    except Exception:\n"
        "        failed.append(info.name + ': ' + traceback.format_exc(limit=1))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"modules that fail to import:\n{done.stdout}{done.stderr}"


def test_ops_imports_nothing_outside_ops():
    graph = import_graph()
    outside = {f"{name} -> {target}"
               for name, targets in graph.items() if name.startswith(f"{PACKAGE}.ops")
               for target in targets if not target.startswith(f"{PACKAGE}.ops")}
    assert not outside, f"ops/ must import only torch (and triton): {sorted(outside)}"


def test_the_integrations_never_import_each_other():
    graph = import_graph()
    owners = [f"{PACKAGE}.integrations.{name}" for name in ("megatron", "deepspeed", "hf")]

    def owner(module: str) -> str | None:
        return next((o for o in owners if module == o or module.startswith(f"{o}.")), None)

    crossing = {f"{name} -> {target}" for name, targets in graph.items() for target in targets
                if owner(name) and owner(target) and owner(name) != owner(target)}
    assert not crossing, f"integrations import each other: {sorted(crossing)}"


def test_evaluation_and_correction_never_import_training():
    """evaluation/ and correction/ read what training/ writes, and the training loop calls
    `evaluate`: no arrow back up. What both need sits below them (generation/, tables/); the
    `evaluate` command gets its Megatron-checkpoint reader from training/ passed in."""
    graph = import_graph()
    readers = (f"{PACKAGE}.evaluation", f"{PACKAGE}.correction", f"{PACKAGE}.generation")
    training = f"{PACKAGE}.training"

    def under(module: str, package: str) -> bool:
        return module == package or module.startswith(f"{package}.")

    upward = {f"{name} -> {target}" for name, targets in graph.items()
              if any(under(name, reader) for reader in readers)
              for target in targets if under(target, training)}
    assert not upward, f"an arrow back up to training/: {sorted(upward)}"


def test_package_root_holds_only_entry_points_and_subpackages():
    allowed = {"__init__.py", "cli.py", "version.py"}
    stray = sorted(
        entry.name for entry in ROOT.iterdir()
        if entry.name not in allowed and entry.name != "__pycache__"
        and not (entry.is_dir() and (entry / "__init__.py").is_file())
    )
    assert not stray, f"the package root holds only {sorted(allowed)} and subpackages: {stray}"


def test_every_cli_command_is_a_module_with_main():
    """cli.COMMANDS declares each subcommand one way: a module whose `main(argv)` runs it."""
    from token_objectives.cli import COMMANDS

    modules = _modules()
    for command, (module, help_text) in COMMANDS.items():
        assert module in modules, f"{command}: no module {module}"
        tree = ast.parse(modules[module].read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == "main"
                   for node in tree.body), f"{command}: {module} has no main(argv)"
        assert help_text, command


def test_no_import_hook_aliases():
    """Every import path is a real module: no sys.meta_path finder maps an old name to another
    module (the aliases token_objectives.megatron/.deepspeed/.hf are gone, not redirected)."""
    hooks = sorted(name for name, path in _modules().items()
                   if any(word in path.read_text() for word in ("meta_path", "_MOVED")))
    assert not hooks, f"import-hook aliases (sys.meta_path, _MOVED) in: {hooks}"
    assert not [finder for finder in sys.meta_path
                if type(finder).__module__.startswith(PACKAGE)], "a package finder on sys.meta_path"


def test_the_checkpoint_writers_helper_process_starts_without_torch():
    """megatron-core's checkpoint writer keeps a spawned helper process for the run (writer_queue
    starts it): spawned, it re-reads the launcher as __mp_main__ and unpickles writer_queue's
    initializer. Neither may load torch or megatron-core, which cost every worker of every
    Megatron run about 2 s of start-up (measured: 2.07 s with the launcher's imports at its
    top, 0.19 s without). The public names still import from the package root."""
    repo = ROOT.parents[1]
    code = ("import runpy, sys\n"
            "runpy.run_path('launch/pretrain_megatron.py', run_name='__mp_main__')\n"
            "import token_objectives.integrations.megatron.writer_queue\n"
            "print(sorted(name for name in ('torch', 'megatron.core') if name in sys.modules))\n"
            "from token_objectives import Objective, ObjectiveConfig, objective_loss\n"
            "print(Objective.__module__, ObjectiveConfig.__module__, objective_loss.__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, public = done.stdout.splitlines()
    assert loaded == "[]", f"the writer's helper process would load {loaded}"
    assert public == ("token_objectives.objectives.objective token_objectives.objectives.config "
                      "objective_loss")
