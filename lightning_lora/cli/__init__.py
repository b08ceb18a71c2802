"""The ``lightning-lora`` command: LightningCLI runs (fit / validate / test / predict) plus ``plan`` and ``export``.

Examples:
    lightning-lora fit --config examples/demo.yaml
    lightning-lora fit --config examples/lora_all_linear.yaml --lora.r 8 --trainer.max_steps 20
    lightning-lora plan --model smollm2-135m-instruct --lora.targets all-linear --lora.layers '"-8:"'
    lightning-lora export --model smollm2-135m-instruct --adapter out/demo/adapter --out out/merged
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

_OWN_COMMANDS = ("plan", "export", "doctor")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-lora`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]: return __import__("lightning_lora.cli.serve", fromlist=["serve_main"]).serve_main(args[1:])  # noqa: E701
    if args and args[0] in _OWN_COMMANDS:
        if args[0] == "doctor":
            from lightning_lora.cli.doctor import doctor_main

            doctor_main(args[1:])
        elif args[0] == "plan":
            from lightning_lora.cli.plan import plan_main

            plan_main(args[1:])
        else:
            from lightning_lora.cli.export import export_main

            export_main(args[1:])
        return
    from lightning_lora.cli.lightning_cli import LoRACLI

    LoRACLI(args=None if argv is None else args)


__all__ = ["main"]
