"""dvc.yaml's code dependencies cannot drift: each stage lists exactly the project modules it imports, directly or
through other modules, so editing a module reruns the stages that use it and no other."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "stages"


def module_file(name: str) -> Path:
    """The file of a project module (`stages.lib.model` -> stages/lib/model.py, a package -> its __init__.py)."""
    path = REPO.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def holds_code(path: Path) -> bool:
    """False for a file that holds only a docstring (an empty package marker): it changes nothing a stage does."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def direct_imports(name: str) -> set[str]:
    """The project modules one module imports (at any depth of its code, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    project = {n for n in found if n.split(".")[0] == PACKAGE and module_file(n).exists()}
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
    return project | {".".join(n.split(".")[:i]) for n in project for i in range(1, n.count(".") + 1)}


def imported_files(entry: str) -> set[str]:
    """Every project file the module `entry` runs when imported, as repository-relative paths."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += direct_imports(name)
    return {module_file(n).relative_to(REPO).as_posix() for n in seen if holds_code(module_file(n))}


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_a_stage_lists_exactly_the_project_modules_it_imports(stage):
    spec = stages()[stage]
    entry = spec["cmd"].split("python -m ", 1)[1].split()[0]
    listed = {dep for dep in spec["deps"] if isinstance(dep, str) and dep.startswith(f"{PACKAGE}/")}
    needed = imported_files(entry)
    assert not needed - listed, f"{stage}: add to its deps in dvc.yaml: {sorted(needed - listed)}"
    assert not listed - needed, f"{stage}: remove from its deps in dvc.yaml (not imported): {sorted(listed - needed)}"
