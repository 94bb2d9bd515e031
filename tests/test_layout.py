"""The package's shape: imports only go down the floors, and no module grows past ~600 lines.

Floors, bottom to top (README "Architecture"):

    ground    errors, atomic, manifest, modelfile/, model/config, tokenizer, sampling, data, train_config
    runtime   runtime/, api                 (never torch)
    torch     model/transformer, optim, checkpoint, train, reference
    compiler  export/ | quantize/, then lower/ (it packs the experts the quantizer left to its
              kernels), then build (composes the stages: folder in, folder out, cached builds)
    tools     bench/, profile | serve/
    cli       cli/

Sides of one floor may import the floors below, never each other: the runtime never reaches the
torch code (the device runs without torch) and the reference never leans on the runtime it is
the check for; export and quantize meet only through the `Program` they hand on. The scan
reads every `import` statement, including the lazy ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "perseus_edge"
MAX_LINES = 600

# module prefix -> (rank, side); the longest matching prefix wins
FLOORS = {
    "perseus_edge.errors": (0, "ground"),
    "perseus_edge.atomic": (0, "ground"),
    "perseus_edge.manifest": (0, "ground"),
    "perseus_edge.modelfile": (0, "ground"),
    "perseus_edge.model": (0, "ground"),
    "perseus_edge.model.config": (0, "ground"),
    "perseus_edge.tokenizer": (0, "ground"),
    "perseus_edge.sampling": (0, "ground"),
    "perseus_edge.data": (0, "ground"),
    "perseus_edge.train_config": (0, "ground"),
    "perseus_edge.runtime": (1, "runtime"),
    "perseus_edge.api": (1, "runtime"),
    "perseus_edge.model.transformer": (1, "torch"),
    "perseus_edge.optim": (1, "torch"),
    "perseus_edge.checkpoint": (1, "torch"),
    "perseus_edge.train": (1, "torch"),
    "perseus_edge.reference": (1, "torch"),
    "perseus_edge.export": (2, "export"),
    "perseus_edge.quantize": (2, "quantize"),
    "perseus_edge.lower": (2.2, "lower"),
    "perseus_edge.build": (2.5, "build"),
    "perseus_edge.bench": (3, "tools"),
    "perseus_edge.profile": (3, "tools"),
    "perseus_edge.serve": (3, "serve"),
    "perseus_edge.cli": (4, "cli"),
}
ROOT = (0, "ground")  # perseus_edge/__init__.py: the version string
# ... and the public face: `perseus_edge.load` & co., imported lazily (and for type checkers)
FACADE = {"perseus_edge.api"}


def floor(module: str) -> tuple[float, str]:
    if module == "perseus_edge":
        return ROOT
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in FLOORS:
            return FLOORS[key]
    raise KeyError(module)


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every perseus_edge import in the file, lazy ones included."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from perseus_edge import modelfile` imports the submodule perseus_edge.modelfile
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if _is_module(sub) else base))
    return [(line, name) for line, name in found if name.split(".")[0] == "perseus_edge"]


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_module_has_a_floor():
    missing = []
    for module, _ in modules():
        try:
            floor(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"modules on no floor (add them to FLOORS and the README): {missing}"


def test_imports_only_go_down():
    upward = []
    for module, path in modules():
        rank, side = floor(module)
        for line, target in imports(module, path):
            t_rank, t_side = floor(target)
            if module == "perseus_edge" and target in FACADE:
                continue
            if t_rank > rank or (t_rank == rank and t_side != side):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({side}) imports {target} ({t_side})")
    assert not upward, "imports going up a floor or across a side:\n" + "\n".join(upward)


def test_the_scan_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from perseus_edge.cli import main\n    from . import reference\n")
    found = imports("perseus_edge.runtime.x", src)
    assert found == [(2, "perseus_edge.cli"), (3, "perseus_edge.runtime")]
    assert floor("perseus_edge.cli") > floor("perseus_edge.runtime.model")


def test_no_module_is_too_long():
    long = {str(path.relative_to(PACKAGE.parent)): n for _, path in modules()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


@pytest.mark.parametrize("word", ["campaign", "call5", "issue 4", "had not landed"])
def test_no_project_history_in_shipped_code(word):
    hits = [str(p.relative_to(PACKAGE.parent)) for _, p in modules() if word in p.read_text().lower()]
    assert not hits, f"{word!r} in shipped code: {hits}"
