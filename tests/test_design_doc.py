"""docs/design.md stays true: its module listing matches the tree, and the layers import one way."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "padnet"
DESIGN = ROOT / "docs" / "design.md"


def listed_modules() -> set[str]:
    text = DESIGN.read_text()
    block = text.split("<!-- module-listing", 1)[1].split("```", 2)[1]
    return {line.split()[0] for line in block.splitlines() if line.strip()}


def test_module_listing_matches_the_tree():
    tree = {str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py")}
    listed = listed_modules()
    assert sorted(tree - listed) == [], "modules missing from docs/design.md"
    assert sorted(listed - tree) == [], "docs/design.md lists modules that do not exist"


def padnet_imports(path: Path) -> set[str]:
    """Absolute ``padnet.x`` modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "padnet" or m.startswith("padnet.")}


ALLOWED = {
    "transforms": ("padnet.transforms", "padnet.layers", "padnet.ops", "padnet._version", "padnet.registry"),
    "io": ("padnet.io", "padnet.transforms", "padnet.layers", "padnet.ops", "padnet.models", "padnet._version",
           "padnet.registry"),
}


def test_transforms_and_io_import_nothing_above_them():
    for package, allowed in ALLOWED.items():
        for path in (PKG / package).glob("*.py"):
            for module in padnet_imports(path):
                assert module != "padnet", f"{path.name} imports the package root"
                assert any(module == a or module.startswith(a + ".") for a in allowed), (
                    f"padnet/{package}/{path.name} imports {module}, above its layer")


def test_no_design_md_outside_docs():
    for path in list(PKG.rglob("*.py")) + list((ROOT / "tests").glob("*.py")) + list((ROOT / "docs").glob("*.md")):
        assert not re.search(r"(?<!docs/)DESIGN\.md", path.read_text()), path
