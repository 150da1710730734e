"""The two ways to install (pip with pyproject.toml, conda with environment.yml) must agree."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip_lines() -> list[str]:
    """The entries of environment.yml's ``pip:`` section (a tiny YAML reader for this one shape)."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    indent = len(lines[start]) - len(lines[start].lstrip())
    entries = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        if line.strip().startswith("- "):
            entries.append(line.strip()[2:].strip())
    return entries


def test_environment_installs_the_package_with_dev_extra():
    assert _conda_pip_lines() == ["-e .[dev]"]


def test_environment_python_matches_requires_python():
    requires = _pyproject()["project"]["requires-python"]
    text = (ROOT / "environment.yml").read_text()
    conda_python = re.search(r"^\s*-\s*python\s*(\S*)\s*$", text, re.M)
    assert conda_python is not None, "environment.yml must pin python"
    assert conda_python.group(1) == requires


def test_environment_lists_no_dependency_of_its_own():
    """Every package besides python and pip comes through pyproject.toml, so nothing can drift."""
    text = (ROOT / "environment.yml").read_text()
    dependencies = text.split("dependencies:", 1)[1]
    top = [d for d in re.findall(r"^  - (\S+)\s*$", dependencies, re.M) if d != "pip:"]
    assert sorted(top) == ["pip", "python>=3.10"]


def test_pyproject_declares_the_required_dependencies():
    project = _pyproject()["project"]
    names = {re.split(r"[<>=!~ \[]", dep)[0].lower() for dep in project["dependencies"]}
    assert names == {"torch", "torchvision", "numpy", "opencv-python", "pycocotools", "matplotlib", "tqdm"}
    dev = {re.split(r"[<>=!~ \[]", dep)[0].lower() for dep in project["optional-dependencies"]["dev"]}
    assert dev == {"pytest", "nbval", "jupyterlab", "ipykernel"}
    assert project["scripts"]["minicenternet"] == "minicenternet.cli:main"


def test_ci_installs_and_tests_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "pytest"):
        assert command in readme
        assert re.search(rf"^{re.escape(command)}$", ci, re.M), command


def test_pytest_collects_tests_and_notebooks():
    options = _pyproject()["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests", "notebooks"]
    for flag in ("--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with"):
        assert flag in options["addopts"]
