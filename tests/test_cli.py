"""The command line: options where users put them, errors as one line with an exit code."""

from __future__ import annotations

import pytest

from replicator.cli import EXIT_CONFIG, main


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "--config", "/nonexistent.toml", "list"],
        ["dlq", "list", "--config", "/nonexistent.toml"],
        ["checkpoints", "list", "-c", "/nonexistent.toml"],
        ["conflicts", "list", "--config", "/nonexistent.toml"],
    ],
)
def test_config_is_accepted_before_or_after_the_action(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(argv)

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert err.strip().splitlines() == [
        "replicator: configuration error: config file '/nonexistent.toml' does not "
        "exist; pass --config with the path of a TOML file (see config/replicator.toml)"
    ]


def test_missing_config_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["dlq", "list"])

    assert exit_info.value.code == 2
    assert "--config" in capsys.readouterr().err
