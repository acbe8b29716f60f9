"""`fastlb --help` and each command's help are enough to start without the README."""

import argparse
import shlex
import subprocess
import sys

import pytest

from fastlb import cli
from fastlb.config import ENV_KEYS

PARSER = cli._parser()
COMMANDS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices


def _help(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fastlb", *args, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_option_and_argument_has_help_and_a_metavar_that_is_not_a_variable(command):
    parser = COMMANDS[command] if command else PARSER
    for action in parser._actions:
        assert action.help, f"fastlb {command}: {action.option_strings or action.dest} has no help"
        shown = action.metavar or action.dest.upper()  # what argparse prints without a metavar
        assert shown not in ENV_KEYS, f"fastlb {command}: metavar {shown}"
    text = _help(*([command] if command else []))
    assert "FASTLB_" not in text.partition("\n\n")[0], text  # the usage lines


def test_each_serve_flag_names_its_variable():
    text = " ".join(_help("serve").split())
    for flag, env, _ in cli._SERVE_FLAGS:
        assert f"[env {env}]" in text, flag


def _examples(text: str) -> list[list[str]]:
    lines = text.replace("\\\n", " ").splitlines()
    commands = [line.split("fastlb ", 1)[1] for line in lines if line.startswith("  ") and "fastlb " in line]
    # A top-level example may end in two or more spaces and a comment, and chain a second command with &&.
    return [shlex.split(part.split("   ")[0]) for command in commands for part in command.split("&& fastlb ")]


@pytest.mark.parametrize("command", ["", "serve", "check"])
def test_the_epilog_has_examples_and_each_one_parses(command):
    text = _help(*([command] if command else []))
    examples = _examples(text.partition("examples:")[2])
    assert len(examples) >= 2, text
    for argv in examples:
        PARSER.parse_args(argv)  # exits (SystemExit) on an example that drifted from the flags


def test_check_argument_is_described():
    text = _help("check")
    assert "FILE" in text and "TOML config file to validate" in text and "exit status" in text
