"""The house rules of issue 14: no import circles, light stages stay light."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT


def _modules_after(statement: str) -> set[str]:
    """Top-level names in ``sys.modules`` after running ``statement`` in a new process."""
    code = f"{statement}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()} | set(out.split())


def test_the_cache_never_imports_keras():
    loaded = _modules_after(
        "import pipeline.cache, pipeline.cache.schema, pipeline.cache.read, "
        "pipeline.cache.writer, pipeline.cache.merge, pipeline.cache.lock"
    )
    assert "keras" not in loaded
    assert "tensorflow" not in loaded


def test_predict_and_export_import_keras_only_to_build_a_model():
    # A wrong path or image list fails before Keras loads; predictor.py spells END_TO_END
    # itself rather than import it from heads.persist (which imports Keras) for this.
    from pipeline.heads.persist import END_TO_END
    from pipeline.predictor import END_TO_END as spelled_in_predictor

    assert spelled_in_predictor == END_TO_END
    loaded = _modules_after("import pipeline.predictor, pipeline.export, pipeline.predict")
    assert "keras" not in loaded
    assert "sklearn" not in loaded


def _import_graph() -> dict[str, set[str]]:
    """Every pipeline module -> the pipeline modules it imports, lazy imports included.

    Read from the source (no import runs): an import inside a function counts, since it
    runs as soon as that function does.
    """
    modules = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_circles():
    graph = _import_graph()
    # A package's __init__ re-exports its modules: importing a module of the package
    # from outside is not a circle through it; one module importing its own package is.
    circles = sorted(
        name for name in graph
        if name in _reach({k: {t for t in v if not name.startswith(t + ".")}
                           for k, v in graph.items()}, name)
    )
    assert not circles, f"modules that import themselves through others: {circles}"


def test_heads_never_import_images_or_bases_and_compare_never_the_demo():
    graph = _import_graph()
    for name in [m for m in graph if m == "pipeline.heads" or m.startswith("pipeline.heads.")]:
        assert not {m for m in _reach(graph, name) if m.split(".")[1] in ("images", "bases")}
    assert "pipeline.demo" not in _reach(graph, "pipeline.compare")
    assert "pipeline.cli" not in _reach(graph, "pipeline.demo")


def test_scripts_import_only_the_cli():
    for script in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        ours = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module and node.module.split(".")[0] in ("pipeline", "benchmarks")}
        assert ours == ({"benchmarks.cli"} if script.name == "bench.py" else {"pipeline.cli"})


def test_pickled_heads_name_the_flatten_step_as_they_always_have():
    # model.joblib files written before heads became a package name pipeline.heads._flatten;
    # new ones must too, so old and new files load alike.
    import pickle

    from pipeline.heads import make_head

    data = pickle.dumps(make_head("logreg"))
    assert b"pipeline.heads.registry" not in data
    assert b"pipeline.heads" in data and b"_flatten" in data
    pickle.loads(data)


def test_readme_lists_the_modules_in_import_order():
    """README's "How the code is laid out": each module imports only those above it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## How the code is laid out", 1)[1].split("```")[1]
    order = [line.split()[0].removeprefix("pipeline/").removesuffix("/").removesuffix(".py")
             for line in block.splitlines() if line.startswith("pipeline/")]
    graph = _import_graph()
    stages = {name: name.split(".")[1] for name in graph if name.count(".")}
    assert sorted(set(stages.values())) == sorted(order), "a module missing from the README"
    for name, stage in stages.items():
        for target in graph[name]:
            if target in stages and stages[target] != stage:
                assert order.index(stages[target]) < order.index(stage), f"{name} -> {target}"
