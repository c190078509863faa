"""The package layering of docs/design.md, enforced on the source (issue 10 item 5).

Layers, bottom first; a module may import its own layer and the ones below,
never one above (function-local imports included), and no module but the
public facade ``padnet/__init__.py`` takes names from the package root:

    _version, registry  <  ops  <  layers  <  transforms  <  models  <  io  <  apps (data, train, commands, cli)

Packages of the plan that do not exist (yet) are skipped; modules outside the
planned packages (old paths still being moved) are not checked until they move.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import padnet

ROOT = Path(padnet.__file__).resolve().parent
LAYERS = {
    "_version": 0, "registry": 0,
    "ops": 1,
    "layers": 2,
    "transforms": 3,
    "models": 4,
    "io": 5,
    "data": 6, "train": 6, "commands": 6, "cli": 6, "__main__": 6,
}
# old locations that the plan moves into the packages above (while any exists the placement test waits)
MOVING = ["analysis", "export", "partition", "config.py", "convert.py", "serialization.py",
          "layers/conv_functional.py"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` for every import in the file (any depth)."""
    name = module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def top_of(module: str) -> str | None:
    """The padnet package (first component under padnet) a module belongs to, or None outside padnet."""
    parts = module.split(".")
    if parts[0] != "padnet":
        return None
    return parts[1] if len(parts) > 1 else ""


def is_submodule(package: str, name: str) -> bool:
    base = ROOT.parent.joinpath(*package.split("."))
    return (base / f"{name}.py").exists() or (base / name / "__init__.py").exists()


def library_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def layer_files(top: str) -> list[Path]:
    return [p for p in library_files() if top_of(module_name(p)) == top]


def violations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        me = module_name(path)
        my_layer = LAYERS[top_of(me)]
        for line, target, names in imports_of(path):
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            top = top_of(target)
            if top is None:
                continue
            if top == "":  # the package root
                root_names = [n for n in names if not is_submodule("padnet", n)]
                if not names or root_names:
                    found.append(f"{where}: imports the package root ({', '.join(root_names) or 'padnet'})")
                tops = [n for n in names if is_submodule("padnet", n)]
            else:
                tops = [top]
            for t in tops:
                if t in LAYERS and LAYERS[t] > my_layer:
                    found.append(f"{where}: {me} (layer {my_layer}) imports padnet.{t} (layer {LAYERS[t]})")
    return found


@pytest.mark.parametrize("top", sorted(LAYERS, key=lambda t: (LAYERS[t], t)))
def test_no_upward_or_package_root_imports(top):
    files = layer_files(top)
    if not files:
        pytest.skip(f"padnet.{top} does not exist (yet)")
    found = violations(files)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_every_library_module_has_a_layer():
    moving = [m for m in MOVING if (ROOT / m).exists()]
    if moving:
        pytest.skip(f"still at their old paths (being moved by issue 10): {moving}")
    unplaced = [str(p.relative_to(ROOT.parent)) for p in library_files()
                if module_name(p) != "padnet" and top_of(module_name(p)) not in LAYERS]
    assert not unplaced, f"modules outside every layer of docs/design.md: {unplaced}"


# ---- the checker itself -------------------------------------------------------------------------


def test_checker_catches_root_and_upward_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "padnet"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "transforms").mkdir()
    (pkg / "__init__.py").write_text("from .layers import x\n")
    (pkg / "registry.py").write_text("")
    (pkg / "transforms" / "__init__.py").write_text("")
    (pkg / "layers" / "__init__.py").write_text("")
    bad = pkg / "layers" / "bad.py"
    bad.write_text(
        "from .. import __version__\n"            # package root
        "import padnet\n"                          # package root
        "from .. import registry\n"                # a bottom module: fine
        "def f():\n"
        "    from ..transforms import thing\n"     # upward, function-local
        "    from padnet.transforms.x import y\n"  # upward, absolute
    )
    ok = pkg / "transforms" / "ok.py"
    ok.write_text("from ..layers import bad\nfrom ..registry import Registry\nfrom . import sibling\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    found = violations([bad])
    assert len(found) == 4, found
    assert "bad.py:1: imports the package root (__version__)" in found[0]
    assert "bad.py:2: imports the package root (padnet)" in found[1]
    assert "bad.py:5: padnet.layers.bad (layer 2) imports padnet.transforms (layer 3)" in found[2]
    assert "bad.py:6:" in found[3]
    assert violations([ok]) == []
