"""The package's layering (docs/protocol.md, README "Layout"): a module imports only from layers
below its own, never upward. Read from the source (every import statement, inside functions too)."""
import ast
import pathlib

import heloco_p2p

# lower number = lower layer; a package may import from itself and from any lower layer
LAYERS = {
    "fsutil": 0, "outer": 0, "swarm": 0, "__version__": 0,
    "algorithms": 1, "data": 1,
    "config": 2,
    "local": 3, "checkpoint": 3,
    "sim": 4,
    "roles": 5,
    "peer": 6,
    "tools": 7,
    "cli": 8, "__main__": 9,
}
ROOT = pathlib.Path(heloco_p2p.__file__).parent


def _imports(path: pathlib.Path, top: str) -> set[str]:
    """The first-level heloco_p2p modules ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("heloco_p2p"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add(top)  # relative imports stay inside the package
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("heloco_p2p."))
    return found


def test_every_module_has_a_layer_and_imports_only_downward():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        top = rel[0]
        if top == "__init__":
            continue
        assert top in LAYERS, f"{path}: add {top!r} to LAYERS (and to the layout in the README)"
        for dep in _imports(path, top) - {top}:
            assert dep in LAYERS, f"{path} imports heloco_p2p.{dep}, which has no layer"
            if LAYERS[dep] >= LAYERS[top]:
                upward.append(f"{path.relative_to(ROOT)} -> {dep}")
    assert upward == []


def test_the_check_finds_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from heloco_p2p.tools.monitor import Monitor\n")
    assert _imports(bad, "roles") == {"tools"}
