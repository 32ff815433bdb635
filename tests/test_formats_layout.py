"""The file formats are peers over one shared core: no format imports another, only the catalog
knows them all, and the package has no import cycle."""

import ast
from pathlib import Path

FORMATS = Path(__file__).resolve().parents[1] / "diyapp" / "formats"
PEERS = {"pt", "json", "hf", "gguf"}


def _imports(path: Path) -> set[str]:
    """Sibling modules of diyapp.formats that ``path`` imports (at any depth of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diyapp.formats."):
            out.add(node.module.split(".")[2])
    return out


def test_each_format_imports_only_the_common_core():
    found = {p.stem: _imports(p) for p in FORMATS.glob("*.py")}
    assert {"common", "catalog", "pt", "json", "hf"} <= set(found)
    assert found["common"] == set()
    for name in PEERS & set(found):
        assert found[name] <= {"common"}, f"formats/{name}.py imports {found[name] - {'common'}}"
    assert {"pt", "json", "hf"} <= found["catalog"]


def test_no_module_of_the_package_imports_back_into_the_old_paths():
    for p in FORMATS.glob("*.py"):
        text = p.read_text(encoding="utf-8")
        for old in ("checkpoint", "json_export", "hf_export", "workflow", "cli", "ui"):
            assert f"from ..{old} import" not in text and f"from ...{old}" not in text, (p.name, old)
