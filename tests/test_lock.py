"""The lock file is what `make setup` installs: the running environment holds exactly its versions, and
every locked version lies inside pyproject.toml's ranges (so `make lock` and the ranges cannot drift apart)."""

import os
import re
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def locked() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, pinned = line.split("==")
                pins[re.sub(r"[-_.]+", "-", name).lower()] = pinned
    return pins


def test_installed_versions_equal_the_lock():
    pins = locked()
    for name in ("torch", "transformers", "ray", "deepspeed", "mlflow", "kfp"):
        installed = Version(version(name))
        assert Version(installed.base_version) == Version(pins[name]) and installed.public == pins[name], (
            f"{name} {installed} is installed but requirements.lock pins {pins[name]}: run `make setup`")


def test_every_locked_version_satisfies_the_project_ranges():
    pins = locked()
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    for spec in requirements:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{name} is a dependency but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"locked {name}=={pins[name]} is outside {spec}"
