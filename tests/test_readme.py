"""The README documents every setting and every metric (DESIGN.md: "the README lists them all")."""

from pathlib import Path

from fastlb.config import ENV_KEYS
from fastlb.obs.metrics import HELP

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_environment_variable_is_in_the_readme():
    assert [name for name in ENV_KEYS if name not in README] == []


def test_every_metric_family_is_in_the_readme():
    assert [family for family in HELP if family not in README] == []
