"""The layer map of docs/architecture.md, kept by reading every import in kvmkit/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kvmkit"

# Lowest first; a module may import its own package and anything in a lower layer.
LAYERS: list[set[str]] = [
    {"base"},
    {"uapi"},
    {"faults"},
    {"kvm"},
    {"memory"},
    {"devices", "loader", "arch", "guests"},
    {"snapshot", "hostcheck"},
    {"machine"},
    {"control", "migration", "testing"},
    {"api"},
    {"faces"},
]
BASE = {"closing", "errors", "libc", "records", "unix_socket", "__init__", "__version__"}
# One-way exceptions between packages of one layer (see the map).
SIDEWAYS = {
    ("control", "migration"),
    ("testing", "control"),
    ("testing", "hostcheck"),
    ("loader", "arch"),
    ("devices", "arch"),
}
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit_of(module: str) -> str:
    """`kvmkit.machine.builder` -> `machine`; `kvmkit.cli_check` -> `faces`; `kvmkit.errors`
    -> `base` (the single-module units of the top and bottom layers are one unit each)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    if name == "__main__" or name == "cli" or name.startswith("cli_"):
        return "faces"
    return "base" if name in BASE else name


def imports() -> list[tuple[str, str, str, int]]:
    """(importing file, importing unit, imported module, line) for every kvmkit import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        unit = unit_of(module if not module.endswith("__init__") else module[: -len(".__init__")])
        if rel.parts == ("kvmkit", "__init__"):
            unit = "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "kvmkit":
                    for alias in node.names:
                        found.append((str(rel), unit, f"kvmkit.{alias.name}", node.lineno))
                elif node.module.startswith("kvmkit."):
                    found.append((str(rel), unit, node.module, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("kvmkit."):
                        found.append((str(rel), unit, alias.name, node.lineno))
    return found


def test_every_unit_is_on_the_map():
    units = {
        unit_of("kvmkit." + p.relative_to(PACKAGE).with_suffix("").parts[0])
        for p in PACKAGE.glob("*")
    }
    units = {u.removesuffix(".py") for u in units if u != "__pycache__"}
    assert units <= set(RANK), f"add to docs/architecture.md and LAYERS: {units - set(RANK)}"


def test_imports_point_down():
    wrong = []
    for path, unit, target, line in imports():
        to = unit_of(target)
        if to == unit:
            continue
        if to not in RANK:  # `from kvmkit import faults` style names a package
            continue
        same = RANK[to] == RANK[unit]
        if RANK[to] > RANK[unit] or (same and (unit, to) not in SIDEWAYS):
            wrong.append(f"{path}:{line}: {unit} imports {target} ({to} is not below it)")
    assert not wrong, "imports that point up the layer map:\n" + "\n".join(wrong)


def test_no_private_names_imported_across_modules():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("kvmkit")
            ):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        wrong.append(
                            f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {alias.name}"
                        )
    assert not wrong, "private names imported from another module:\n" + "\n".join(wrong)
