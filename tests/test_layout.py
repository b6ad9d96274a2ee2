"""The library's layout holds: each folder of stages/lib imports only the folders below it (the order is in
stages/lib/__init__.py), no folder grows past a handful of modules, and no two modules share a file name."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "stages" / "lib"


def layer_order() -> list[str]:
    """The folders from the bottom up, as stages/lib/__init__.py's docstring lists them (`base -> ... -> daily`)."""
    docstring = ast.get_docstring(ast.parse((LIB / "__init__.py").read_text(encoding="utf-8")))
    line = next(line for line in docstring.splitlines() if "->" in line)
    return [name.strip() for name in line.split("->")]


def folders() -> list[str]:
    return sorted(p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def imported_folders(path: Path) -> set[str]:
    """The stages.lib folders a module imports, at any depth of its code (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            match = re.match(r"stages\.lib\.(\w+)", name)
            if match:
                found.add(match.group(1))
    return found


def test_the_layer_order_names_every_folder_once():
    assert sorted(layer_order()) == folders()


@pytest.mark.parametrize("folder", folders())
def test_a_folder_imports_only_the_folders_below_it(folder):
    order = layer_order()
    below = set(order[: order.index(folder) + 1])
    for path in sorted((LIB / folder).glob("*.py")):
        wrong = imported_folders(path) - below
        assert not wrong, (f"{path.relative_to(REPO)} imports {sorted(wrong)}, above {folder} in "
                           f"stages/lib/__init__.py's order: move the shared code down, or the module up")


@pytest.mark.parametrize("folder", folders())
def test_a_folder_says_what_it_owns_and_stays_small(folder):
    init = ast.parse((LIB / folder / "__init__.py").read_text(encoding="utf-8"))
    docstring = ast.get_docstring(init) or ""
    assert "Imports:" in docstring, f"stages/lib/{folder}/__init__.py: say what the folder owns and may import"
    assert len(init.body) == 1, f"stages/lib/{folder}/__init__.py: a docstring only, so importing it loads nothing"
    modules = [p for p in (LIB / folder).glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 13, f"stages/lib/{folder} holds {len(modules)} modules: split it by job"


def test_no_loose_modules_and_no_two_modules_share_a_name():
    assert [p.name for p in LIB.glob("*.py")] == ["__init__.py"], "library modules live in a folder of stages/lib"
    names = {}
    for path in sorted((REPO / "stages").rglob("*.py")):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(path.relative_to(REPO).as_posix())
    twins = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not twins, f"modules that share a file name: {twins}"
