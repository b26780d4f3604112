"""The ``replicator`` command: parse arguments, set up logging, run, map errors to exit codes.

Exit codes: 0 done, 1 a fatal error, 2 a configuration error (the message names
the key and the fix), 3 lost the instance lock, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import logging
import sys
from collections.abc import Sequence

from replicator import __version__
from replicator.errors import ConfigError, LostLockError, ReplicatorError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_LOST_LOCK = 3
EXIT_INTERRUPTED = 130

# Each subcommand lives in a module exposing add_arguments(parser) and
# run(args) -> int, imported only when chosen so start-up stays fast.
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("replicator.demo", "run the embedded demo: ERP, replica and live traffic"),
    "run": ("replicator.daemon", "run the replication daemon"),
    "verify": ("replicator.verify", "compare each source with its mirror, row by row"),
    "checkpoints": (
        "replicator.store.checkpoints_cli",
        "list, inspect or restore checkpoints",
    ),
    "status": (
        "replicator.ops.status",
        "show each stream's state, position, lag and rates",
    ),
    "emulator": ("replicator.emulator.cli", "serve the local Salesforce org emulator"),
    "resync": ("replicator.resync", "reload one ERP table or Salesforce object"),
    "dlq": ("replicator.store.dlq_cli", "list, retry or drop parked changes"),
    "conflicts": (
        "replicator.store.conflicts_cli",
        "list field conflicts and their rule",
    ),
    "matches": (
        "replicator.matches_cli",
        "list duplicate candidates waiting for review, link or create them",
    ),
    "check": (
        "replicator.check",
        "verify every prerequisite against the configured systems",
    ),
    "bi-role": (
        "replicator.bi_role",
        "create a read-only role for BI on sf, erp, unified",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replicator", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    parser.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        default="auto",
        help="text on a terminal, JSON elsewhere (default: auto)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        sub.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_arguments(sub)
        _config_anywhere(sub)
    return parser


def _config_anywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--config`` after an action too (``dlq list --config F``)."""
    config = next((a for a in parser._actions if a.dest == "config"), None)
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if config is None or not actions or not config.required:
        return
    config.required = False
    parser.set_defaults(_config_required=True)
    for action_parser in actions[0].choices.values():
        action_parser.add_argument(
            *config.option_strings,
            dest="config",
            default=argparse.SUPPRESS,
            help=config.help,
        )


def _is_operator_change(args: argparse.Namespace) -> bool:
    action = getattr(args, "action", None)
    return (
        args.command in ("resync", "bi-role")
        or (args.command == "checkpoints" and action == "restore")
        or (args.command == "dlq" and action in ("retry", "drop"))
        or (args.command == "matches" and action in ("link", "create"))
    )


def _audit(args: argparse.Namespace, argv: list[str], code: int) -> None:
    """Record an operator command that changed something in the audit trail."""
    import asyncio

    import asyncpg

    from replicator import config as config_module
    from replicator.store import audit

    async def write() -> None:
        settings = config_module.load(args.config)
        conn = await asyncpg.connect(settings.replica.resolve())
        try:
            await audit.record(
                conn,
                "operator",
                args.command,
                {
                    "argv": argv,
                    "action": getattr(args, "action", None),
                    "exit_code": code,
                    "user": os.environ.get("USER"),
                },
            )
        finally:
            await conn.close()

    try:
        asyncio.run(write())
    except (OSError, ReplicatorError, asyncpg.PostgresError) as exc:
        logger.warning(
            "operator command not recorded in the audit trail",
            extra={"command": args.command, "error": str(exc)},
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_config_required", False) and not getattr(args, "config", None):
        parser.error(
            f"{args.command}: the following arguments are required: --config/-c"
        )

    from replicator.log import setup_logging

    setup_logging(verbose=args.verbose, fmt=args.log_format)
    try:
        module = importlib.import_module(args._module)
        code = int(module.run(args))
        if _is_operator_change(args):
            _audit(args, list(argv if argv is not None else sys.argv[1:]), code)
        return code
    except ConfigError as exc:
        print(f"replicator: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LostLockError as exc:
        logger.error("instance lock lost", extra={"error": str(exc)})
        print(f"replicator: {exc}", file=sys.stderr)
        return EXIT_LOST_LOCK
    except ReplicatorError as exc:
        logger.error("fatal error", extra={"error": str(exc)})
        print(f"replicator: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
