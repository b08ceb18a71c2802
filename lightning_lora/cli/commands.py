"""The table of ``lightning-lora`` subcommands: adding a command is adding one :class:`Command` entry.

Nothing here imports Lightning, transformers or a command's module: ``lightning-lora --help`` lists the table without
loading any of them, and a command's module is imported only when that command runs.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One subcommand: ``function(argv)`` in ``module`` runs it with the arguments after the command name.

    Args:
        name: The word typed after ``lightning-lora``.
        module: Dotted module path, imported only when the command runs.
        function: Name of a function in ``module`` taking the remaining arguments (a list of strings).
        help: One line shown by ``lightning-lora --help``.
    """

    name: str
    module: str
    function: str
    help: str

    def load(self) -> Callable[[Sequence[str]], Any]:
        """Import the command's module and return its entry function."""
        return getattr(importlib.import_module(self.module), self.function)


_LCLI = "lightning_lora.cli.lightning_cli"

COMMANDS: tuple[Command, ...] = (
    Command("fit", _LCLI, "fit_main", "Train (LoRA / QLoRA / full fine-tuning) from a YAML config and --key value overrides."),
    Command("validate", _LCLI, "validate_main", "Run the validation loop once (loss, perplexity, exact match)."),
    Command("test", _LCLI, "test_main", "Score the held-out set with the test loop."),
    Command("predict", _LCLI, "predict_main", "Generate answers for the prediction set."),
    Command("plan", "lightning_lora.cli.plan", "plan_main",
            "Dry run: list the layers a LoRA config would wrap (no weights read)."),
    Command("export", "lightning_lora.cli.export", "export_main",
            "Merge an adapter into its base model and save both (no training)."),
    Command("serve", "lightning_lora.cli.serve", "serve_main",
            "Serve one base model and many adapters behind an OpenAI-compatible API (vLLM's endpoints)."),
    Command("doctor", "lightning_lora.cli.doctor", "doctor_main",
            "Check an adapter before serving it: shapes, untrained or non-finite layers, wrong base, vLLM rules."),
)


def find(name: str) -> Command | None:
    """The command called ``name``, or None."""
    return next((c for c in COMMANDS if c.name == name), None)


def closest(name: str) -> str | None:
    """The command name closest to a misspelt one (``fitt`` -> ``fit``), or None."""
    match = difflib.get_close_matches(name, [c.name for c in COMMANDS], n=1, cutoff=0.5)
    return match[0] if match else None


def overview(prog: str = "lightning-lora") -> str:
    """The top-level help: usage, one line per command, where to read more."""
    width = max(len(c.name) for c in COMMANDS)
    lines = [
        f"usage: {prog} <command> [options]",
        "",
        "LoRA, QLoRA and the other PEFT methods for PyTorch Lightning.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.help}" for c in COMMANDS),
        "",
        f"Run `{prog} <command> --help` for a command's options (flags use underscores: --trainer.max_steps).",
        "Set LIGHTNING_LORA_DEBUG=1 to see full tracebacks instead of one-line errors.",
        f"Example: {prog} fit --config examples/demo.yaml",
    ]
    return "\n".join(lines) + "\n"
