"""The shape of the package: imports point one way (no circle, lazy imports included) and functions fit on a
screen. Bugs caught: a reader importing the CLI (prepared.py did), a module importing one that imports it back."""
import ast
from pathlib import Path

import ddpm

PACKAGE = Path(ddpm.__file__).parent


def imports_of(path: Path, level: int = 1) -> set[str]:
    """The package modules a file imports, at the top or inside functions: relative (`from .x import y`,
    `from . import x`) and absolute (`from ddpm.x import y`, `from ddpm import x`, `import ddpm.x`). `level` is the
    relative level that reaches the package (2 inside a subpackage such as cli/, whose `.x` are its own parts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == level or (node.level == 0 and node.module and (
                node.module == "ddpm" or node.module.startswith("ddpm.")))):
            inside = node.module.split(".", 1)[1] if node.level == 0 and "." in node.module else (
                None if node.level == 0 else node.module)
            found |= {inside.split(".")[0]} if inside else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ddpm.")}
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports; a subpackage (cli/) is one node, its files' imports together."""
    modules = {p.stem: {p} for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    modules |= {d.name: set(d.glob("*.py")) for d in PACKAGE.iterdir() if (d / "__init__.py").is_file()}
    return {name: set().union(*(imports_of(f, 1 if f.parent == PACKAGE else 2) for f in files)) & set(modules) - {name}
            for name, files in modules.items()}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None (depth-first search with a path stack)."""
    done, path = set(), []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for other in sorted(graph.get(name, ())):
            found = visit(other)
            if found:
                return found
        path.pop()
        done.add(name)
        return None

    return next((c for c in (visit(n) for n in sorted(graph)) if c), None)


def test_the_import_graph_has_no_circle():
    graph = package_graph()
    assert "cli" in graph and "training" in graph["cli"] and "cli" not in set().union(*graph.values())
    assert cycle_in(graph) is None, " -> ".join(cycle_in(graph))
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself can fail


def test_every_spelling_of_a_package_import_is_seen(tmp_path):
    # The bug it catches: a circle written with absolute imports (`from ddpm import training`) passing unseen.
    source = tmp_path / "m.py"
    source.write_text("from . import a\nfrom .b import x\nfrom ddpm import c\nfrom ddpm.d import y\n"
                      "import ddpm.e\nimport ddpm.f.g as h\nimport os\nfrom os import path\n"
                      "def later():\n    from ddpm.i import j\n")
    assert imports_of(source) == {"a", "b", "c", "d", "e", "f", "i"}


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def oversized(limit_module: int = 600, limit_class: int = 200) -> list[str]:
    """Modules over `limit_module` lines and classes over `limit_class`, as 'name (lines)'."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > limit_module:
            found.append(f"{path.relative_to(PACKAGE)} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit_class:
                found.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_no_module_over_600_lines_and_no_class_over_200():
    # The bug it catches (issue 34): features piling into a few rooms (data.py had 676 lines, the Trainer 296).
    assert not oversized(), oversized()
    assert oversized(limit_module=500, limit_class=150)  # the check itself can fail: training.py, the Trainer


def test_plant_bug_reports_a_caught_bug_and_puts_the_file_back(tmp_path):
    # bugs caught: the planted file left broken after the run, a bug the tests caught reported as one that lived
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "plant_bug.py"
    (tmp_path / "mod.py").write_text("VALUE = 1\n")
    (tmp_path / "test_mod.py").write_text("from mod import VALUE\n\n\ndef test_value():\n    assert VALUE == 1\n")

    def plant(new):
        return subprocess.run([sys.executable, str(script), "mod.py", "VALUE = 1", new, "--", "test_mod.py"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    caught, lived = plant("VALUE = 2"), plant("VALUE = 1  # the same")
    assert caught.returncode == 0 and caught.stdout.startswith("CAUGHT"), caught.stdout + caught.stderr
    assert lived.returncode == 1 and lived.stdout.startswith("LIVED"), lived.stdout + lived.stderr
    assert (tmp_path / "mod.py").read_text() == "VALUE = 1\n"
