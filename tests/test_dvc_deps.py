"""dvc.yaml's code dependencies cannot drift: each stage lists the project modules it imports, directly or through
other modules, so editing a module reruns the stages that use it. A stage lists a library folder (DVC hashes the whole
directory) when it imports most of that folder's modules, and single modules otherwise, so an edit to a module it does
not use does not rerun an expensive stage."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "stages"


def module_file(name: str) -> Path:
    """The file of a project module (`stages.lib.base.files` -> stages/lib/base/files.py; a package: its __init__)."""
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


def folder_modules(folder: str) -> set[str]:
    """The modules of a library folder that hold code, as repository-relative paths."""
    return {p.relative_to(REPO).as_posix() for p in (REPO / folder).glob("*.py") if holds_code(p)}


def covered(path: str, listed: set[str]) -> bool:
    return path in listed or any(path.startswith(f"{dep}/") for dep in listed)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_a_stage_lists_the_project_modules_it_imports(stage):
    spec = stages()[stage]
    entry = spec["cmd"].split("python -m ", 1)[1].split()[0]
    listed = {dep.rstrip("/") for dep in spec["deps"] if isinstance(dep, str) and dep.startswith(f"{PACKAGE}/")}
    needed = imported_files(entry)
    missing = sorted(path for path in needed if not covered(path, listed))
    assert not missing, f"{stage}: add to its deps in dvc.yaml (the module or its folder): {missing}"
    for dep in sorted(listed):
        if (REPO / dep).is_dir():
            used, held = folder_modules(dep) & needed, folder_modules(dep)
            assert 2 * len(used) > len(held), (
                f"{stage}: lists the folder {dep} but imports only {sorted(used)} of it: list those modules instead")
        else:
            assert dep in needed, f"{stage}: remove {dep} from its deps in dvc.yaml (not imported)"
            folder = dep.rsplit("/", 1)[0]
            if folder != PACKAGE and 2 * len(folder_modules(folder) & needed) > len(folder_modules(folder)):
                pytest.fail(f"{stage}: imports most of {folder}: list the folder instead of its modules")
