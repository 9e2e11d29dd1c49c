"""Every third-party module medclf imports is declared in pyproject.toml: CI installs only what is declared, so a
module that happens to be in the developer's venv would pass here and fail there."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def top_level_imports(folder: Path) -> set[str]:
    """The first component of every absolute import in the package's source, wherever it sits (lazy imports too)."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def undeclared(modules: set[str], allowed: set[str]) -> list[str]:
    distributions = packages_distributions()
    missing = []
    for module in sorted(modules - set(sys.stdlib_module_names) - {"medclf", "__future__"}):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & allowed:
            missing.append(f"{module} (distribution {', '.join(sorted(names))})")
    return missing


def test_every_module_medclf_imports_is_a_declared_dependency():
    assert undeclared(top_level_imports(ROOT / "medclf"), declared()) == []


def test_every_module_the_tests_import_is_declared_with_dev():
    local = {p.stem for p in (ROOT / "tests").glob("*.py")}
    # kagglesdk comes with kagglehub (a declared dependency): its kaggle_env is what the fake server patches
    modules = top_level_imports(ROOT / "tests") - local - {"kagglesdk"}
    assert undeclared(modules, declared("dev")) == []
