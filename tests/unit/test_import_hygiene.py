"""The core stays light and headless: importing it loads no torch, vllm, transformers or textual."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "textual", "vllm", "transformers")
LIGHT_MODULES = ("replay", "replay.record.recorder", "replay.read.recording", "replay.schema", "replay.store.weights",
                 "replay.metrics", "replay.fixes", "replay.cli.main", "replay.store.doctor", "replay.store.salvage",
                 "replay.read.views", "replay.output", "replay.store.manifest", "replay.errors")
IMPORT_RE = re.compile(r"^\s*(?:from|import)\s+(textual|tui)\b"
                       r"|(?:import_module|__import__|find_spec)\(\s*[\"'](?:textual|tui)\b", re.M)


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_import_leaves_heavy_packages_unloaded(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {module} loaded {r.stdout.strip()}"


def test_cli_help_loads_no_heavy_package():
    code = ("import sys, contextlib, io\nfrom replay.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_no_core_file_imports_textual_or_tui():
    """Neither by an import statement nor by name through importlib."""
    offenders = []
    for path in sorted((REPO / "replay").rglob("*.py")):
        for m in IMPORT_RE.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(REPO)}: {m.group(0).strip()}")
    assert offenders == []


def test_the_import_check_itself_catches_offenders():
    assert IMPORT_RE.search("x = 1\nfrom textual.app import App\n")
    assert IMPORT_RE.search("    import tui.app")
    assert IMPORT_RE.search("app = importlib.import_module('tui.app')")
    assert IMPORT_RE.search('mod = __import__("textual")')
    assert not IMPORT_RE.search("# the tui imports replay\nimport tuition\n")


def _module_level_imports(packages=("replay", "tui"), *, inside_functions: bool = False) -> dict[str, set[str]]:
    """{module: modules of these packages it imports when it is itself imported} (imports inside
    functions run later, on a call, and are left out unless ``inside_functions``)."""
    import ast

    def name(p: Path) -> str:
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name(p): p for pkg in packages for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        todo = list(ast.parse(path.read_text()).body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not inside_functions:
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                # `from pkg import mod` needs mod; `from pkg import name` needs pkg itself
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names}
            todo.extend(ast.iter_child_nodes(node))
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_at_module_level():
    """A cycle makes a module fail when it is the first one imported (the V0 engine did)."""
    graph = _module_level_imports()
    assert "replay.engines.vllm.v0" in graph and "replay.engines.vllm.engine" in graph["replay.engines.vllm.v0"]
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check works


def test_no_import_cycle_even_through_imports_inside_functions():
    """A lazy import only hides a cycle from the import system: two modules that need each
    other are one concept split badly (a shared record or rule belongs in a third module)."""
    graph = _module_level_imports(inside_functions=True)
    # the lazy edges are in: the Triton path is imported inside capture_logits only
    assert "replay.trainer.capture_triton" in graph["replay.trainer.capture"]
    assert "replay.trainer.capture_triton" not in _module_level_imports()["replay.trainer.capture"]
    assert _cycles(graph) == []


def test_the_v0_engine_module_imports_first():
    r = subprocess.run([sys.executable, "-c", "import replay.engines.vllm.v0 as m; print(m.VLLMV0Engine.__name__)"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "VLLMV0Engine", r.stderr
