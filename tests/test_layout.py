"""Module layout of the marginops package, checked on the source (AST), not by importing it.

* ``reference`` is the oracle only: production code imports it solely inside the reference backend's
  dispatch branch (``if backend == "reference":`` in ops.py and functional.py); the package's
  ``__init__`` re-exports it as the public ``marginops.reference``.
* loss assembly (row losses, reduction, MarginStats) lives in ``loss_assembly``, which imports nothing
  from marginops, so functional, distributed and reference share it without an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import marginops
from marginops import functional, loss_assembly

PACKAGE = Path(marginops.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("marginops",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(path: Path, import_time_only: bool = False):
    """(imported module names, enclosing ast.If nodes, line) for every import statement in ``path``; with
    ``import_time_only`` only those that run when the module is imported (not inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node, ifs):
        if import_time_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            out.append(([alias.name for alias in node.names], ifs, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from pkg import sub" may import the submodule pkg.sub: count both
            out.append(([module] + [f"{module}.{alias.name}" for alias in node.names], ifs, node.lineno))
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            inner = ifs + (node,) if isinstance(node, ast.If) and field == "body" else ifs
            for child in children:
                if isinstance(child, ast.AST):
                    visit(child, inner)

    visit(tree, ())
    return out


def _is_reference_branch(node: ast.If) -> bool:
    test = node.test
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "backend"
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "reference"
    )


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "reference.py")


def test_only_the_reference_backend_imports_the_oracle():
    offenders = []
    for path in _sources():
        if path == PACKAGE / "__init__.py":
            continue  # the public re-export marginops.reference
        for modules, ifs, line in _imports(path):
            if "marginops.reference" in modules and not any(_is_reference_branch(node) for node in ifs):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert not offenders, "marginops.reference imported outside the reference backend's dispatch: " + ", ".join(
        offenders
    )


def _module_graph(import_time_only: bool):
    """marginops module -> the marginops modules it imports (all imports, or those that run at import time)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        edges = set()
        for modules, _, _ in _imports(path, import_time_only):
            base, *submodules = modules
            named = [m for m in submodules if m in paths]
            edges.update(named or ([base] if base in paths else []))
        graph[name] = edges
    return graph


ENTRY_POINTS = {"marginops", "marginops.functional", "marginops.distributed", "marginops.nn", "marginops.ops"}


def test_reference_imports_no_entry_point():
    """The oracle uses the math (margin specs, non-target modes, loss assembly), never the production entry points
    (the old layout imported functional.make_stats from inside reference.margin_cross_entropy)."""
    deps = _module_graph(import_time_only=False)["marginops.reference"]
    bad = sorted(m for m in deps if m in ENTRY_POINTS or m.startswith("marginops.compat"))
    assert not bad, f"reference.py imports {bad}"


def test_no_import_time_cycle_through_reference():
    """Nothing that reference.py imports when it is loaded imports reference.py (or an entry point) back."""
    graph = _module_graph(import_time_only=True)
    seen, todo = set(), ["marginops.reference"]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    assert "marginops.reference" not in seen, "import cycle through reference.py"
    assert not seen & ENTRY_POINTS, f"loading reference.py loads {sorted(seen & ENTRY_POINTS)}"


def test_loss_assembly_depends_on_nothing_in_marginops():
    for modules, _, line in _imports(PACKAGE / "loss_assembly.py"):
        assert not any(m == "marginops" or m.startswith("marginops.") for m in modules), (
            f"loss_assembly.py:{line} imports {modules}"
        )


def test_margin_stats_reexported():
    assert marginops.MarginStats is functional.MarginStats is loss_assembly.MarginStats
    assert functional.make_stats is loss_assembly.make_stats


def _cycles(graph):
    """Every elementary cycle's smallest rotation, found by depth-first search from each module."""
    found = set()

    def walk(start, node, path):
        for dep in sorted(graph.get(node, ())):
            if dep == start:
                cycle = path[:]
                turn = cycle.index(min(cycle))
                found.add(tuple(cycle[turn:] + cycle[:turn]))
            elif dep not in path and dep > start:  # each cycle once, from its smallest module
                walk(start, dep, path + [dep])

    for start in sorted(graph):
        walk(start, start, [start])
    return sorted(found)


def test_no_import_cycle_in_the_package():
    """No module of marginops imports itself back through others, counting imports inside functions too: the
    layers (capabilities, config, _scalar_checks → margins → _validation → ops → functional → nn, distributed)
    stay layers.  The package's __init__ (the public re-exports) is left out."""
    graph = _module_graph(import_time_only=False)
    graph = {name: {d for d in deps if d != "marginops"} for name, deps in graph.items() if name != "marginops"}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c + (c[0],)) for c in cycles)


# ---------------------------------------------------------------------------------------------------------------
# triton_kernels gets what it needs from its caller, marginops/ops.py (switches, the non-target mode's bound, the
# hybrid plan's chunk sizes), and imports nothing from marginops

TRITON_KERNELS = Path(__file__).resolve().parent.parent / "triton_kernels"


def _triton_kernels_imports():
    """(file, line, imported module as written, relative level) of every import in triton_kernels/*.py."""
    out = []
    for path in sorted(TRITON_KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                out.extend((path.name, node.lineno, alias.name, 0) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                out.append((path.name, node.lineno, node.module or "", node.level))
    return out


def test_triton_kernels_imports_nothing_from_marginops():
    imports = _triton_kernels_imports()
    assert any(level == 1 for _, _, _, level in imports), "the scan found no relative import: is it reading the files?"
    offenders = [
        f"triton_kernels/{name}:{line} imports {'.' * level}{module}"
        for name, line, module, level in imports
        # level 2 reaches marginops when installed as marginops.triton_kernels; marginops by name
        if level >= 2 or module == "marginops" or module.startswith("marginops.")
    ]
    assert not offenders, "triton_kernels must get what it needs from its caller:\n" + "\n".join(offenders)


def test_triton_kernels_reads_no_package_state_through_sys_modules():
    """The launchers' switches arrive as their `switches` argument (packed by pack_switches), never read back
    through sys.modules or the environment."""
    for path in sorted(TRITON_KERNELS.glob("*.py")):
        text = path.read_text()
        for needle in ("sys.modules", "os.environ", "getenv"):
            assert needle not in text, f"triton_kernels/{path.name} uses {needle}"


# ---------------------------------------------------------------------------------------------------------------
# C++ layout: device-agnostic sources at csrc/, one folder per device, no device folder reaching into another

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DEVICE_AGNOSTIC = ("chunk_loop.h", "margin_math.h", "op_args.h", "switches.h")


def _includes(path: Path) -> list[str]:
    """The quoted #include paths of a C++ source."""
    lines = path.read_text().splitlines()
    return [line.split('"')[1] for line in lines if line.startswith('#include "') and line.count('"') >= 2]


def test_device_agnostic_sources_sit_at_csrc():
    for name in DEVICE_AGNOSTIC:
        assert (CSRC / name).is_file(), f"csrc/{name} missing"
    for name in DEVICE_AGNOSTIC:
        strays = [p.relative_to(CSRC) for p in CSRC.rglob(name) if p.parent != CSRC]
        assert not strays, f"{name} also in {strays}"


def test_device_folders_include_only_themselves_and_csrc():
    """csrc/cpu and csrc/cuda include their own files and the device-agnostic ones at csrc/, never each other's
    (the chunked CUDA path used to include the chunk loop from csrc/cpu)."""
    offenders = []
    for device in ("cpu", "cuda"):
        for path in sorted((CSRC / device).iterdir()):
            if path.suffix not in (".h", ".cpp", ".cu", ".cuh"):
                continue
            for inc in _includes(path):
                if not ((CSRC / device / inc).is_file() or (inc in DEVICE_AGNOSTIC)):
                    offenders.append(f"csrc/{device}/{path.name} includes {inc!r}")
    assert not offenders, "\n".join(offenders)


def test_one_problem_struct_and_one_chunk_loop():
    """The CPU backend and the chunked CUDA path run the one chunk loop of csrc/chunk_loop.h with its one Problem."""
    sources = {p: p.read_text() for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")}
    problems = [p.relative_to(CSRC) for p, text in sources.items() if "struct Problem " in text]
    assert problems == [Path("chunk_loop.h")], problems
    for user in ("cpu/fused_lse_cpu.cpp", "cuda/fused_lse_chunked.cu"):
        text = sources[CSRC / user]
        assert "chunked::forward<" in text and "chunked::backward<" in text, f"{user} does not run the shared loop"
        assert "parallel_for" not in text, f"{user} has a chunk loop of its own"
