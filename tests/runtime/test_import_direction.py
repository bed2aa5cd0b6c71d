"""The dependency rule, read from the source:
runtime <- training <- compare <- build <- parity <- cli.

Every `import` in lossx, at module level or inside a function, may name lossx modules of its
own layer or of a layer below; lossx.errors, lossx.files and lossx itself sit under all. torch,
torchvision and onnxscript are imported by build and parity only (and by the CLI, lazily).
"""

import ast
from pathlib import Path

import pytest

import lossx

PACKAGE = Path(lossx.__file__).parent
LAYERS = ["runtime", "training", "compare", "build", "parity", "cli"]  # each uses those before it
TORCH_FREE = ("runtime", "training", "compare")
BASE = {"lossx", "lossx.errors", "lossx.files"}
TORCH_SIDE = {"torch", "torchvision", "onnxscript"}


def layer(module: str) -> int:
    parts = module.split(".")
    return -1 if module in BASE else LAYERS.index(parts[1])


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def lossx_module(name: str) -> str | None:
    """The lossx module (or package) an imported name refers to, else None."""
    parts = name.split(".")
    while parts:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts) if parts[0] == "lossx" else None
        parts.pop()
    return None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in SOURCES:
        name = module_name(path)
        assert name in BASE or name.split(".")[1] in LAYERS, f"{name} belongs to no layer"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    name = module_name(path)
    allowed = layer(name)
    for target in filter(None, map(lossx_module, imported(path))):
        assert layer(target) <= allowed, f"{name} imports {target}, a layer above it"


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if module_name(p).partition(".")[2].split(".")[0] in TORCH_FREE],
    ids=lambda p: module_name(p),
)
def test_runtime_training_and_compare_never_import_torch(path):
    heads = {name.split(".")[0] for name in imported(path)}
    assert not heads & TORCH_SIDE, f"{module_name(path)} imports {heads & TORCH_SIDE}"


def test_the_rule_is_enforced_where_it_is_broken(tmp_path):
    """The checker itself: a runtime module importing build, or compare importing parity,
    is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from lossx.build.models import build_model\nimport lossx.parity.check\n")
    targets = set(filter(None, map(lossx_module, imported(bad))))
    assert {"lossx.build.models", "lossx.parity.check"} <= targets
    assert all(layer(t) > layer("lossx.runtime.api") for t in targets)
