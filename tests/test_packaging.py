"""The first run, as a newcomer meets it: what the install files and the README promise."""

import ast
import re
import sys
from pathlib import Path

import dalle_lesson

ROOT = Path(dalle_lesson.__file__).resolve().parent.parent
# import name -> the distribution that provides it
# (IPython comes with ipywidgets, which needs it)
DISTRIBUTIONS = {"PIL": "pillow", "open_clip": "open_clip_torch", "IPython": "ipywidgets"}


def declared_dependencies() -> dict[str, str]:
    """Distribution name (lower case) -> its version specifier, from pyproject.toml."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        name, specifier = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
        found[name.lower().replace("-", "_")] = specifier
    return found


def third_party_imports() -> set[str]:
    names = set()
    for path in (ROOT / "dalle_lesson").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "dalle_lesson" and n != "__future__"}


def test_every_imported_package_is_a_declared_dependency():
    declared = declared_dependencies()
    for name in third_party_imports():
        distribution = DISTRIBUTIONS.get(name, name).lower().replace("-", "_")
        assert distribution in declared, f"dalle_lesson imports {name} but pyproject.toml does not depend on it"


def test_the_torch_lower_bound_has_the_api_the_code_calls():
    bound = re.search(r">=\s*(\d+)\.(\d+)", declared_dependencies()["torch"]).groups()
    assert tuple(map(int, bound)) >= (2, 5), "safe_globals (the OpenAI dVAE reader) needs torch 2.5"
    assert "safe_globals" in (ROOT / "dalle_lesson" / "openai_dvae.py").read_text()


def test_the_conda_environment_takes_pytorch_from_conda_forge():
    text = (ROOT / "environment.yml").read_text()
    channels = re.search(r"channels:\n((?:\s+- .*\n)+)", text).group(1).split()
    assert [c for c in channels if c != "-"] == ["conda-forge"]
    assert "cpuonly" not in text and "pytorch-cpu" in text


def test_the_readme_puts_the_cpu_install_first_and_keeps_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.index("## Quick start")
    assert readme.index("download.pytorch.org/whl/cpu") < quick_start
    assert re.search(r"Colab\W+already has PyTorch", readme[:quick_start])
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", readme, flags=re.S).group(1)
    assert len(block.strip().splitlines()) == 2
    assert "~/.cache/dalle_lesson" in readme
    assert re.search(r"test command takes about \d+ minutes on a 2-core CPU", readme)
