"""The package's shape: no import cycles (lazy imports included), modules of one job and a
bounded size, TensorFlow only in the input pipeline. Read from the source with `ast`."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mae_jax"
MAX_LINES = 350


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """mae_jax modules `name` imports anywhere in its source (top level or inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from a.b import c` imports a.b, and a.b.c when c is a module.
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != name}
    return found


def top_level_names(name: str) -> set[str]:
    """Names of all packages `name` imports at module level (not inside functions)."""
    tree = ast.parse(MODULES[name].read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def all_imported_names(name: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_there_is_no_import_cycle_not_even_through_lazy_imports():
    graph = {name: imports_of(name) for name in MODULES}
    # A package's __init__ re-exporting its submodules is not a dependency of those modules.
    graph = {
        name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()
    }
    visiting, done = [], set()

    def visit(name):
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: it does more than one job"


def test_tensorflow_is_imported_only_by_the_input_pipeline():
    outside = [name for name in MODULES
               if not name.startswith("mae_jax.data") and "tensorflow" in all_imported_names(name)]
    assert outside == []


def test_model_step_and_checkpoint_code_never_reach_tensorflow():
    # The GPU machine has no TensorFlow: what the train step needs must import without it.
    tf_modules = {name for name in MODULES if "tensorflow" in all_imported_names(name)}
    for root in ("mae_jax.core", "mae_jax.models", "mae_jax.weights"):
        for name in (n for n in MODULES if n.startswith(root)):
            reached, stack = set(), [name]
            while stack:
                for dependency in imports_of(stack.pop()) - reached:
                    reached.add(dependency)
                    stack.append(dependency)
            assert not reached & tf_modules, (name, sorted(reached & tf_modules))
            # clu's writer imports TensorFlow: only lazily, in the logging setup.
            assert "clu" not in top_level_names(name), name
