"""The commands' --help is readable as printed: defaults shown, no raw reStructuredText."""

from __future__ import annotations

import pytest

from server.settings import ServerSettings, build_arg_parser
from ssole_hub.cli import main as ssole_hub_main
from training.evaluate import main as evaluate_main


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
