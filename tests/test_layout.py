"""The package's imports run one way: no cycles, and model modules never import the engine or the CLI."""

import ast
from pathlib import Path

import dalle_lesson

PACKAGE = Path(dalle_lesson.__file__).parent
MODEL_MODULES = ["vae", "dvae", "openai_dvae", "vqvae", "bpe", "attention", "dalle", "sampling", "plan", "clip",
                 "evaluate", "clip_guided", "unclip"]
ABOVE_THE_MODELS = {"train", "stages", "cli", "pipeline"}


def package_imports(module: str) -> set[str]:
    """Every ``dalle_lesson`` module that ``module`` imports, anywhere in the file (functions too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dalle_lesson"):
            if node.module == "dalle_lesson":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dalle_lesson.")}
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")]
    return {module: package_imports(module) & set(modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state, path = {}, []

    def visit(node):
        state[node], _ = "open", path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    assert find_cycle(import_graph()) is None, find_cycle(import_graph())


def test_model_modules_import_neither_the_engine_nor_the_cli():
    graph = import_graph()
    for module in MODEL_MODULES:
        assert not graph[module] & ABOVE_THE_MODELS, (module, graph[module] & ABOVE_THE_MODELS)


def test_every_parser_lives_in_cli():
    for path in PACKAGE.glob("*.py"):
        if path.stem != "cli":
            assert "argparse" not in path.read_text(), f"{path.name} builds a parser; parsers belong in cli.py"


def test_the_package_map_lists_every_module():
    text = dalle_lesson.__doc__
    for path in PACKAGE.glob("*.py"):
        if path.stem not in ("__init__", "__main__"):
            assert path.stem in text, f"dalle_lesson/__init__.py's map does not mention {path.stem}"


def recorded_commands() -> list[str]:
    """Every ``dalle-lesson ...`` command in data/README.md's code blocks, continuation lines joined."""
    import re

    text = (PACKAGE.parent / "data" / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    joined = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line.split("dalle-lesson", 1)[1].split() for line in joined if "dalle-lesson " in line]


def test_every_recorded_command_in_data_readme_parses():
    from dalle_lesson.cli import build_parser

    commands = recorded_commands()
    assert len(commands) >= 6
    for words in commands:
        args = build_parser().parse_args(words)  # exits (fails the test) on an unknown flag
        assert args.out.startswith("data/")


def executed_notebooks() -> list[Path]:
    return sorted((PACKAGE.parent / "notebooks").rglob("*.ipynb"))


def test_executed_notebooks_read_well_without_a_kernel():
    """What a reader on the web sees: no saved widget state, no widget outputs, no bar frozen at 0 %
    (notebooks/execute.py writes them so)."""
    import json

    assert len(executed_notebooks()) >= 7
    for path in executed_notebooks():
        notebook = json.loads(path.read_text())
        assert "widgets" not in notebook["metadata"], f"{path.name} saves widget state: run notebooks/execute.py"
        for cell in notebook["cells"]:
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                assert "application/vnd.jupyter.widget-view+json" not in data, f"{path.name} has a widget output"
                text = "".join(data.get("text/plain", "")) + "".join(output.get("text", ""))
                assert " 0%|" not in text, f"{path.name} shows a progress bar frozen at 0 %: {text[:80]!r}"


def test_every_lesson_with_exercises_has_checkers_and_solutions():
    for path in sorted((PACKAGE.parent / "notebooks").glob("0[0-5]_*.ipynb")):
        number = path.name[:2]
        assert (PACKAGE / "exercises" / f"lesson{number}.py").exists(), f"no checkers for {path.name}"
        assert (PACKAGE.parent / "notebooks" / "solutions" / f"{number}_solutions.ipynb").exists(), \
            f"no solutions notebook for {path.name}"
        assert f"exercises import lesson{number}" in path.read_text(), f"{path.name} never calls its checkers"
