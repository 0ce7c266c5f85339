"""Imports run one way: no cycle among cnnlab modules, config/ and the registries are leaves, lower
stages never import higher ones, and `cnnlab --help` / `cnnlab explain` never import torch.

Module-level imports only (read with `ast`; imports inside functions and `if TYPE_CHECKING:` blocks are
deferred on purpose). Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`: those edges count.
"""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / "cnnlab").rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _top_level_imports(name: str, path: Path) -> set[str]:
    """The cnnlab modules `name` imports when it is imported (explicit imports only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):  # still run at import time
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, None) or [])
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "cnnlab")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if base.split(".")[0] != "cnnlab":
                    continue
                for a in node.names:  # `from cnnlab.models import zoo` imports the module cnnlab.models.zoo
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


EXPLICIT = {name: _top_level_imports(name, path) for name, path in MODULES.items()}


def _with_parents(mods: set[str]) -> set[str]:
    out = set()
    for m in mods:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


GRAPH = {name: _with_parents(deps) - {name} for name, deps in EXPLICIT.items()}
for _name in MODULES:  # a module's own packages run first
    GRAPH[_name] |= _with_parents({_name.rpartition(".")[0]}) - {"", _name} if "." in _name else set()
# A facade package (config/) whose __init__ imports its own modules for its public names: when one of them
# runs, that __init__ is already running (it imported the module, or importing the module started it and it
# imports its modules first), so the module -> package edge is no cycle. A module that imports the package
# itself for a name is one, and still counts (its explicit edge).
FACADES = {name for name, path in MODULES.items() if path.name == "__init__.py"
           and any(d.startswith(name + ".") for d in EXPLICIT[name])}
for _name in MODULES:
    for _pkg in FACADES:
        if _name.startswith(_pkg + ".") and _pkg not in EXPLICIT[_name]:
            GRAPH[_name].discard(_pkg)


def test_the_import_graph_was_read():
    assert len(MODULES) > 40 and "cnnlab.config" in MODULES and "cnnlab.models.zoo" in MODULES
    assert "cnnlab.models._registry" in EXPLICIT["cnnlab.models.zoo"]
    assert "cnnlab.models" in GRAPH["cnnlab.models.zoo"]  # the package runs before its module
    assert FACADES == {"cnnlab.config"}, FACADES  # the one package whose __init__ imports its own modules
    assert "cnnlab.config.schema" in GRAPH["cnnlab.config.coerce"] and "cnnlab.errors" in GRAPH["cnnlab.config.schema"]


def test_no_import_cycle_among_cnnlab_modules():
    try:
        list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


LEAVES = {  # module -> the only cnnlab modules it may import
    "cnnlab.errors": set(),
    # config/: one way inside too, schema <- coerce, dotted <- checks <- __init__ (the public face)
    "cnnlab.config.schema": {"cnnlab.errors"},
    "cnnlab.config.coerce": {"cnnlab.config.schema"},
    "cnnlab.config.dotted": {"cnnlab.config.schema"},
    "cnnlab.config.checks": {"cnnlab.config.schema", "cnnlab.config.coerce"},
    "cnnlab.config": {"cnnlab.config.schema", "cnnlab.config.coerce", "cnnlab.config.dotted", "cnnlab.config.checks"},
    "cnnlab.registry": {"cnnlab.errors"},
    "cnnlab.models._registry": {"cnnlab.registry"},
    "cnnlab.data._registry": {"cnnlab.registry"},
}


def _any_imports(path: Path) -> set[str]:
    """Every cnnlab module named in any import of the file, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cnnlab")
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "cnnlab"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else str(node.module)
                         for a in node.names)
    return found


@pytest.mark.parametrize("module", sorted(LEAVES))
def test_leaves_import_only_leaf_helpers(module):
    """Not even inside a function: config/ checks values, and names are checked where things are built."""
    used = _any_imports(MODULES[module])
    assert used <= LEAVES[module], f"{module} imports {sorted(used - LEAVES[module])}"


def test_packages_import_the_registry_leaf_and_nothing_points_back():
    for name, deps in EXPLICIT.items():
        for pkg in ("cnnlab.models", "cnnlab.data"):
            if name.startswith(pkg + ".") and name not in (f"{pkg}._registry",):
                # a file inside the package never imports the package's __init__ for a name (the E402 pattern)
                assert pkg not in deps, f"{name} imports from {pkg}/__init__ (import {pkg}._registry instead)"
    for pkg in ("cnnlab.models", "cnnlab.data"):
        assert not {d for d in EXPLICIT[pkg] if d.startswith(pkg + ".")}, f"{pkg}/__init__ imports its files eagerly"
    for name, path in MODULES.items():  # (report/plots.py's matplotlib.use("Agg") before pyplot is another matter)
        if name.startswith(("cnnlab.models", "cnnlab.data")) or path.name == "__init__.py":
            assert "noqa: E402" not in path.read_text(encoding="utf-8"), path


FORBIDDEN = {  # stage -> what it must never import at module level (lower stages never reach up)
    "cnnlab.analysis": {"cnnlab.data", "cnnlab.models", "cnnlab.training", "cnnlab.report", "cnnlab.studies",
                        "cnnlab.cli", "cnnlab.process", "cnnlab.dist", "cnnlab.config"},
    "cnnlab.data": {"cnnlab.models", "cnnlab.training", "cnnlab.report", "cnnlab.studies", "cnnlab.cli",
                    "cnnlab.analysis", "cnnlab.process"},
    "cnnlab.models": {"cnnlab.data", "cnnlab.training", "cnnlab.report", "cnnlab.studies", "cnnlab.cli",
                      "cnnlab.analysis", "cnnlab.process", "cnnlab.dist"},
    "cnnlab.training": {"cnnlab.report", "cnnlab.studies", "cnnlab.cli"},
    "cnnlab.report": {"cnnlab.studies", "cnnlab.cli"},
    "cnnlab.studies": {"cnnlab.cli"},
    "cnnlab.deploy": {"cnnlab.studies", "cnnlab.cli"},
    "cnnlab.process": {"cnnlab.data", "cnnlab.models", "cnnlab.training", "cnnlab.report", "cnnlab.studies",
                       "cnnlab.cli"},
}


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_lower_stages_never_import_higher_ones(stage):
    bad = {f"{name} -> {dep}" for name, deps in EXPLICIT.items() if name == stage or name.startswith(stage + ".")
           for dep in deps for f in FORBIDDEN[stage] if dep == f or dep.startswith(f + ".")}
    assert not bad, sorted(bad)


def test_every_package_says_what_it_owns_and_may_import():
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "cnnlab":
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            assert "import" in doc.lower() and len(doc) > 80, f"{name}: the package docstring says too little"


def test_library_model_names_are_parsed_in_one_place():
    """`torchvision:` / `timm:` prefixes: only models/_registry.py tests them (library_of)."""
    offenders = []
    for name, path in MODULES.items():
        if name == "cnnlab.models._registry":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("startswith", "partition", "split"):
                consts = [c.value for a in node.args for c in ast.walk(a) if isinstance(c, ast.Constant)]
                if any(isinstance(c, str) and c.rstrip(":") in ("torchvision", "timm") for c in consts):
                    offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders


def test_every_config_choice_has_a_builder():
    """The choice lists live once, as Literal types in config/schema.py; each builder covers every choice."""
    import torch
    from torch import nn

    from cnnlab import config as C
    from cnnlab.data import loader
    from cnnlab.models import init_weights
    from cnnlab.training import optim

    assert set(loader._PAD_MODES) == set(typing.get_args(C.PaddingMode))
    from cnnlab.deploy import cli as deploy_cli
    from cnnlab.deploy import export

    assert set(deploy_cli.EXPORT_FORMATS) == set(export.SUFFIX)  # `cnnlab export --format` offers what exists
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    for scheme in typing.get_args(C.InitScheme):
        init_weights(model, scheme)
    kinds = {type(optim.build_optimizer(model, C.OptimConfig(name=n))) for n in typing.get_args(C.OptimName)}
    assert len(kinds) == len(typing.get_args(C.OptimName))
    for name in typing.get_args(C.ScheduleName):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        optim.build_scheduler(opt, C.ScheduleConfig(name=name), C.OptimConfig(), epochs=2, steps_per_epoch=3)


def test_help_and_explain_never_import_torch():
    """`cnnlab --help`, each command's --help and `cnnlab explain ...` in a fresh interpreter: no torch."""
    script = """
import sys
from cnnlab import cli
runs = [["--help"], ["explain", "conv", "--input", "[[1,2,0],[3,4,1],[0,1,2]]", "--kernel", "box"],
        ["explain", "output-size", "--input", "32", "--kernel", "3", "--stride", "1", "--output", "32"],
        ["explain", "params", "--conv", "3,16,3"]]
parser = cli.build_parser()
commands = parser._subparsers._group_actions[0].choices
runs += [[c, "--help"] for c in commands]
runs += [["data", s, "--help"] for s in commands["data"]._subparsers._group_actions[0].choices]
runs += [["explain", s, "--help"] for s in commands["explain"]._subparsers._group_actions[0].choices]
for argv in runs:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, None), (argv, code)
print("COMMANDS", " ".join(sorted(commands)))
print("TORCH", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.startswith(("COMMANDS", "TORCH")))
    assert set(lines["COMMANDS"].split()) >= {"train", "eval", "report", "compare", "summary", "explain", "data"}
    assert lines["TORCH"] == "[]", lines["TORCH"]
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import cnnlab.cli"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "cnnlab.cli" in r.stderr, r.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "torch" not in imported and "cnnlab.data.catalog" not in imported
