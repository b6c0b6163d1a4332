"""The README's commands, CI and the lock (requirements/lock.txt) stay in step."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    return re.findall(r"```bash\n(python3 -m venv[^\n]+)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    demo, tests = _readme_commands()
    assert "examples/demo.py" in demo and "pytest" in tests
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def _lock() -> dict[str, str]:
    """requirements/lock.txt as {normalized name: pinned version}."""
    from packaging.utils import canonicalize_name

    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", (ROOT / "requirements" / "lock.txt").read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def test_the_readme_commands_install_the_locked_versions():
    torch = _lock()["torch"]
    for command in _readme_commands():
        installs = re.findall(r"\.venv/bin/pip install ([^&]+)", command)
        assert len(installs) == 2 and all(i.startswith("-c requirements/lock.txt ") for i in installs), command
        assert f"torch=={torch} " in installs[0]  # torch first, the locked build


def test_the_lock_pins_every_dependency_of_the_test_and_hf_extras_within_pyproject_ranges():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lock = _lock()
    target = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64",
              "python_version": "3.11"}  # what the lock is resolved for
    for line in project["dependencies"] + extras["test"] + extras["hf"]:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(target):
            name = canonicalize_name(req.name)
            assert name in lock, f"{name} is not in requirements/lock.txt: refresh it with scripts/lock.sh"
            assert req.specifier.contains(lock[name]), f"{name}=={lock[name]} is outside pyproject's {req.specifier}"
