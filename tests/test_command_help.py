"""The commands' --help is readable as printed: defaults shown, no raw reStructuredText."""

from __future__ import annotations

import argparse
import re

import pytest

from server.settings import ServerSettings, build_arg_parser
from ssole_hub.cli import _build_parser as ssole_hub_parser
from ssole_hub.cli import main as ssole_hub_main
from training.demo import main as demo_main
from training.evaluate import main as evaluate_main

SSOLE_HUB_COMMANDS = next(
    a for a in ssole_hub_parser()._actions if isinstance(a, argparse._SubParsersAction)
).choices
RST_MARKUP = re.compile(r"``|:[a-z]+:`|`[^`\s]+`_")


def _help(main, argv=("--help",)) -> None:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 0


def test_server_help_shows_every_default_and_the_queue_rule():
    text = " ".join(build_arg_parser().format_help().split())
    for shown in (
        "(required)",
        "(default: 127.0.0.1)",
        "(default: 8000)",
        f"(default: {ServerSettings.model_fields['max_batch_size'].default})",
        "(default: 256)",
        "(default: 64)",
        "(default: none)",
        "(default: on)",
        "at least --max-items",
    ):
        assert shown in text, shown


def test_evaluate_help_shows_defaults(capsys):
    _help(evaluate_main)
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "kNN neighbours (default: 20)",
        "(default: 0.07)",
        "(default: 100)",
        "(default: auto)",
    ):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize(
    "argv", [["--help"], ["export", "--help"], ["convert", "--help"], ["extract", "--help"]]
)
def test_ssole_hub_help_has_no_restructuredtext_markup(argv, capsys):
    _help(ssole_hub_main, argv)
    text = capsys.readouterr().out
    assert "usage: ssole-hub" in text and "``" not in text


@pytest.mark.parametrize("command", sorted(SSOLE_HUB_COMMANDS))
def test_every_ssole_hub_option_has_help_and_shows_its_default(command, capsys):
    """Walks the real parser: every argument of the subcommand has help text that --help prints,
    and every option with a default (not a flag's False, not None) shows it there."""
    _help(ssole_hub_main, [command, "--help"])
    printed = capsys.readouterr().out
    squeezed = "".join(printed.split())  # argparse wraps lines, also at hyphens
    actions = [
        a for a in SSOLE_HUB_COMMANDS[command]._actions if not isinstance(a, argparse._HelpAction)
    ]
    assert actions
    for action in actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help"
        assert "".join(action.help.split()) in squeezed, f"{command} {name}"
        if action.default not in (None, False) and not action.required:
            assert f"(default:{action.default})" in squeezed, f"{command} {name}"
    assert "(default:None)" not in squeezed and "(default:False)" not in squeezed


def test_extract_backend_defaults_to_auto_like_the_server(capsys):
    backend = next(a for a in SSOLE_HUB_COMMANDS["extract"]._actions if a.dest == "backend")
    assert backend.default == "auto" == ServerSettings.model_fields["backend"].default
    _help(ssole_hub_main, ["extract", "--help"])
    assert "(default: auto)" in " ".join(capsys.readouterr().out.split())


def test_demo_help_is_plain_text_with_its_defaults(capsys):
    _help(demo_main)
    text = capsys.readouterr().out
    assert "usage: python -m training.demo" in text and "make demo" in text
    assert not RST_MARKUP.search(text), RST_MARKUP.search(text)
    flat = " ".join(text.split())
    for shown in (
        "(default: demo_out)",
        "default: digits",
        "(default: 127.0.0.1)",
        "(default: 8000)",
    ):
        assert shown in flat, shown
