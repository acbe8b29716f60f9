"""The README and docs/ document what the code does (the README lists every variable and metric), and
the generated documents match their generator."""

import re
import tomllib
from pathlib import Path

import bcrypt
import pytest

from fastlb import config, reference
from fastlb.config import ENV_KEYS
from fastlb.obs.metrics import HELP

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_every_environment_variable_is_in_the_readme():
    assert [name for name in ENV_KEYS if name not in README] == []


def test_every_metric_family_is_in_the_readme():
    assert [family for family in HELP if family not in README] == []


@pytest.mark.parametrize("name", sorted(reference.GENERATED))
def test_generated_documents_match_the_code(name):
    committed = (ROOT / "docs" / name).read_text()
    assert committed == reference.GENERATED[name](), f"docs/{name} is out of date: run python -m fastlb.reference"


def _anchors(markdown: str) -> set[str]:
    # GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens.
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@pytest.mark.parametrize("document", ["README.md", "docs/architecture.md", "docs/configuration.md"])
def test_links_resolve_inside_the_repository(document):
    text = (ROOT / document).read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path = (ROOT / document).parent / target if target else ROOT / document
        assert path.resolve().is_relative_to(ROOT.resolve()) and path.is_file(), (document, target)
        if anchor:
            assert anchor in _anchors(path.read_text()), (document, target, anchor)
    assert "DESIGN.md" not in text  # not in this repository


def test_install_commands_work_from_a_clone():
    # fastlb is not published: an install by name would fetch another project or nothing.
    assert re.findall(r"pip install (?:-U )?'?fastlb", README) == []


def test_pip_installs_the_man_page():
    # `man fastlb` after `pip install .`: man-db searches <prefix>/share/man for each <prefix>/bin on PATH.
    # (An editable install, as tox's, leaves data files out: this reads the packaging config instead.)
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert files["share/man/man1"] == ["docs/fastlb.1"]
    assert "man fastlb " in README


def test_license_is_the_apache_text_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.parametrize("block", re.findall(r"```toml\n(.*?)```", README, re.S), ids=lambda b: b.split("\n")[0])
def test_every_toml_example_in_the_readme_loads(block, tmp_path, monkeypatch):
    for name in re.findall(r'"([\w.-]+\.(?:pem|key))"', block):
        (tmp_path / name).write_text("certificate files are only opened by the loader\n")
    for name in re.findall(r'"([\w.-]+\.htpasswd)"', block):  # read at load: a real bcrypt line
        (tmp_path / name).write_bytes(b"alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)) + b"\n")
    # Hook modules are imported at load: the functions the block names, in a module of that name.
    modules = {m: set() for m in re.findall(r'^module = "([\w]+)"', block, re.M)}
    for module, function in re.findall(r'^hook = "(\w+):(\w+)"', block, re.M):
        modules.setdefault(module, set()).add(function)
    for module, functions in modules.items():
        (tmp_path / f"{module}.py").write_text("".join(f"def {f}(req):\n    pass\n" for f in functions))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "example.toml"
    path.write_text(block)
    config.load(str(path), {})


def test_the_readme_shows_tls_in_toml():
    blocks = "\n".join(re.findall(r"```toml\n(.*?)```", README, re.S))
    for needle in ("tls = true", "[[tls.certificates]]", "redirect_to_https = true", "SNI"):
        assert needle in blocks, needle
