"""environment.yml and pyproject.toml must pin the same packages."""

from __future__ import annotations

import re

import tomllib
import yaml

from labeler_utils.core.config import PROJECT_ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0].lower()


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = (
        set(project["dependencies"])
        | set(project["optional-dependencies"]["documents"])
        | set(project["optional-dependencies"]["dev"])
        | set(project["optional-dependencies"]["ray"])
    )
    environment = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("-e")}
    assert {_name(r): r for r in listed} == {_name(r): r for r in wanted}


def test_install_script_lets_pip_cache_the_llama_cpp_wheel():
    script = (PROJECT_ROOT / "scripts" / "install.sh").read_text()
    build = re.search(r'CMAKE_ARGS="[^"]*-DGGML_NATIVE=OFF[^"]*" \\\n\s*(.*llama-cpp-python\[server\].*)', script)
    assert build and "--no-cache-dir" not in build.group(1)  # pip's wheel cache keeps the 6-minute build


def test_the_mpnet_extra_lists_the_pieces_the_model_cache_checks():
    from labeler_utils.core.models import MPNET

    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["mpnet"] == MPNET.requirements
    script = (PROJECT_ROOT / "scripts" / "install.sh").read_text()
    # the pieces' packages declare an unused Orange add-on as dependency: the script installs the files only
    assert re.search(r"install --quiet --no-deps \$MPNET_PIECES\n.*prepare-models all-mpnet-base-v2", script)
