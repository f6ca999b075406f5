"""The package: the built wheel ships zoo, zoo.commands, zoo.models and the weights maps (no top-level
`models`); public names are never module names; the library neither parses argv nor prints."""
import ast
import pathlib
import pkgutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"zoo"}, f"the wheel must install only the zoo package, not {top_level}"
    for arch in ("bigram", "scratchformer", "gpt2", "llama", "mqa"):
        assert f"zoo/models/{arch}.py" in names
    commands = {f"zoo/commands/{p.name}" for p in (ROOT / "zoo" / "commands").glob("*.py")}
    assert commands <= set(names), f"commands missing from the wheel: {commands - set(names)}"
    maps = {f"zoo/weights_maps/{p.name}" for p in (ROOT / "weights_maps").glob("*.json")}
    assert maps <= set(names), f"weights maps missing from the wheel: {maps - set(names)}"
    assert "zoo/static/chat.html" in names, "zoo serve's chat page is missing from the wheel"

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    script = f"""
import sys
sys.path.insert(0, {str(target)!r})
import torch, zoo, zoo.models.llama
assert zoo.__file__.startswith({str(target)!r}), zoo.__file__
model = zoo.load("shakespeare-char")
assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 65)
try:
    import models
except ImportError:
    print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr + run.stdout


def test_no_module_shares_a_name_with_a_public_function():
    """`import zoo.x` binds the package attribute x to the module: no public name may be a module's too."""
    import zoo
    modules = {m.name for m in pkgutil.iter_modules(zoo.__path__)}
    assert not modules & set(zoo.__all__), modules & set(zoo.__all__)
    for name in zoo.__all__:
        assert callable(getattr(zoo, name)), name


LIBRARY = sorted(p for p in (ROOT / "zoo").glob("*.py") if p.name not in ("cli.py", "__main__.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_library_modules_neither_parse_argv_nor_print(path):
    """The command line lives in zoo/cli.py and zoo/commands/; the library imports no argparse, calls no
    print (notes go to the "zoo" logger), reaches its siblings without the `zoo` facade, and never looks
    for files beside the repository."""
    tree = ast.parse(path.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 and not n.level}
    assert "argparse" not in imported and "zoo" not in imported, imported
    prints = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert not prints, f"print() on lines {prints}"
    assert "shared" not in {part for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                            for part in n.value.replace("\\", "/").split("/")}


# The optional extras: imported where they are used, so that the package works without their dependencies
OPTIONAL = {"zoo.server", "zoo.harness"}


def _sibling_imports(path):
    """[(zoo module imported, at module level?)] for every import of a zoo module in `path`: `from . import x`
    and `from .x import y` resolved against the package; names imported from a module count as the module."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = package.removesuffix(".__init__") if path.name == "__init__.py" else package.rpartition(".")[0]
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "zoo").rglob("*.py")}
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
              for n in ast.walk(f)}
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level:
            base = package.rsplit(".", n.level - 1)[0] if n.level > 1 else package
            base = f"{base}.{n.module}" if n.module else base
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in n.names]
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names = [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
            targets = [m for m in names if m and m.split(".")[0] == "zoo"]
        else:
            continue
        found += [(t, id(n) not in nested) for t in dict.fromkeys(targets) if t in modules]
    return found


PACKAGE = sorted((ROOT / "zoo").rglob("*.py"))


def test_imports_go_one_way_down():
    """The package is layered (README's layout): each module imports its siblings at the top, so that what it
    depends on is visible, and no two modules depend on each other through any chain of imports. The only
    function-level imports of siblings are the optional extras (server, harness), whose dependencies are
    optional installs."""
    graph, late = {}, []
    for path in PACKAGE:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for target, module_level in _sibling_imports(path):
            if module_level:
                graph.setdefault(name, set()).add(target)
            elif target not in OPTIONAL:
                late.append(f"{name} imports {target} inside a function")
    assert not late, late
    graph = {m: {t for t in ts if t != "zoo" and t != m} for m, ts in graph.items() if m != "zoo"}
    done, path = set(), []

    def visit(m):  # depth-first: a module met again while on the current path closes a circle
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t)
        path.pop()
        done.add(m)
    for m in sorted(graph):
        visit(m)
    assert {"zoo.sources", "zoo.pretrained", "zoo.registry"} <= done | set(graph)  # (the test sees the package)


def test_importing_the_package_leaves_the_compiler_and_transformers_unloaded():
    """Every `zoo` command imports the package: torch._dynamo alone would add ~1.7 s to each start (it is
    what torch.compiler.disable and torch.compile import), transformers ~2 s. They load when used."""
    code = ("import sys, zoo, zoo.cli\n"
            "print(sorted(m for m in ('torch._dynamo', 'transformers', 'peft', 'lm_eval') if m in sys.modules))\n"
            "zoo.engine.Engine, zoo.prepack.prepack  # (the README's names, after `import zoo` alone)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
