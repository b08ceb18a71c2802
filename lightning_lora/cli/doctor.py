"""``lightning-lora doctor``: check an adapter directory against its base model before serving it.

Prints a table (config rank vs tensor shapes, all-zero B layers, relative update size per layer), the effect on a
few probe prompts (KL divergence and greedy output against the base), tied-weight and vLLM warnings.
Exit status: 0 healthy, 1 problems (untrained, non-finite, wrong base, shapes that do not fit), 2 usage errors.

Example:
    lightning-lora doctor --model smollm2-135m-instruct --adapter out/demo/adapter
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def build_parser() -> ArgumentParser:
    """The ``doctor`` command's arguments."""
    parser = ArgumentParser(prog="lightning-lora doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str, default="smollm2-135m-instruct",
                        help="The base model: alias, local save_pretrained directory, or hub name.")
    parser.add_argument("--adapter", type=str, required=True, help="Adapter directory (PEFT format).")
    parser.add_argument("--prompts", type=Optional[list[str]], default=None,
                        help="Probe prompts (default: three short general prompts).")
    parser.add_argument("--max_new_tokens", type=int, default=12, help="Greedy tokens per probe prompt.")
    parser.add_argument("--dtype", type=str, default="float32",
                        help="Weight dtype of the base: auto, float32, bfloat16.")
    parser.add_argument("--json", type=bool, default=False, help="Print the report as JSON instead of a table.")
    return parser


def doctor_main(argv: Sequence[str]) -> None:
    """Run ``lightning-lora doctor`` with ``argv``; exits 1 on problems, 2 on usage errors."""
    args = build_parser().parse_args(list(argv))
    from lightning_lora.surgery.diagnostics.doctor import DEFAULT_PROBES, diagnose_adapter, report_json

    if not Path(args.adapter).is_dir():
        _usage(f"--adapter {args.adapter!r}: no such directory; give a PEFT adapter directory "
               "(adapter_config.json + adapter_model.safetensors).")
    try:
        from lightning_lora.modules.loading import load_causal_lm

        model, tokenizer = load_causal_lm(args.model, args.dtype)
    except (OSError, ValueError) as err:
        _usage(f"--model {args.model!r}: cannot load it ({err}).")
    try:
        report = diagnose_adapter(model.eval(), args.adapter, tokenizer=tokenizer,
                                  prompts=args.prompts if args.prompts is not None else DEFAULT_PROBES,
                                  max_new_tokens=args.max_new_tokens)
    except FileNotFoundError as err:
        _usage(str(err))
    sys.stdout.write((report_json(report) if args.json else str(report)) + "\n")
    if not report.healthy:
        sys.exit(EXIT_PROBLEMS)


def _usage(message: str) -> None:
    sys.stderr.write(f"lightning-lora doctor: error: {message}\n")
    sys.exit(EXIT_USAGE)
