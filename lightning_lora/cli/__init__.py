"""The ``lightning-lora`` command: one table of subcommands (:mod:`lightning_lora.cli.commands`).

Examples:
    lightning-lora --help
    lightning-lora fit --config examples/demo.yaml
    lightning-lora fit --config examples/lora_all_linear.yaml --lora.r 8 --trainer.max_steps 20
    lightning-lora plan --model smollm2-135m-instruct --lora.targets all-linear --lora.layers -8:
    lightning-lora export --model smollm2-135m-instruct --adapter out/demo/export/adapter --out out/merged

A mistake in the command line or a config file prints one or two lines (what is wrong, what is valid, a close match)
and exits with status 2; ``LIGHTNING_LORA_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_lora.cli.commands import COMMANDS, Command, closest, find, overview
from lightning_lora.cli.errors import (
    EXIT_USAGE,
    CommandLineError,
    debug_enabled,
    user_error_message,
)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-lora`` console script.

    Raises:
        SystemExit: With status 2 after printing a short message, for a bad command line, config file, model path,
            data file or LoRA setting (unless ``LIGHTNING_LORA_DEBUG`` is set, which re-raises the original error).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        (sys.stdout if args else sys.stderr).write(overview())
        if not args:
            raise SystemExit(EXIT_USAGE)
        return
    command = find(args[0])
    if command is None:
        _fail(_unknown_command(args[0]))
    try:
        run(command, args[1:])
    except Exception as err:  # only errors the user can fix become short messages; the rest re-raise
        message = user_error_message(err)
        if message is None or debug_enabled():
            raise
        _fail(message, command)


def run(command: Command, argv: Sequence[str]) -> None:
    """Run one command with the arguments after its name (slices rewritten, YAML files checked first)."""
    from lightning_lora.cli.errors import check_yaml_files, config_paths, rewrite_slices
    from lightning_lora.cli.quiet import quiet_known_noise

    quiet_known_noise()
    args = rewrite_slices(argv)
    check_yaml_files(config_paths(args))
    command.load()(args)


def _unknown_command(name: str) -> str:
    guess = closest(name)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return f"unknown command {name!r}{hint} Commands: {', '.join(c.name for c in COMMANDS)}."


def _fail(message: str, command: Command | None = None) -> None:
    prog = f"lightning-lora {command.name}" if command else "lightning-lora"
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(EXIT_USAGE)


__all__ = ["COMMANDS", "Command", "CommandLineError", "main"]
