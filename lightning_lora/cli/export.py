"""``lightning-lora export``: base model + adapter directory -> merged model, without training.

Writes ``<out>/merged`` (a ``save_pretrained`` directory with the tokenizer, loadable by
``AutoModelForCausalLM.from_pretrained``), ``<out>/adapter`` (a copy of the adapter, PEFT format) and
``<out>/export.json`` with the largest merged-vs-unmerged logit difference on a probe batch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Literal, Optional

from jsonargparse import ArgumentParser

from lightning_lora.cli.parsing import ShortErrors, use_flat_config_keys
from lightning_lora.surgery.io.export import ExportReport, export_merged

log = logging.getLogger(__name__)

MergeBaseName = Literal["dequantized", "original", "requantize"]


class _Parser(ShortErrors, ArgumentParser):
    """jsonargparse's parser with short errors."""


def build_parser() -> ArgumentParser:
    """The ``export`` command's arguments."""
    from lightning_lora.surgery.quant.config import QuantConfig

    use_flat_config_keys()
    parser = _Parser(prog="lightning-lora export", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="config", help="A YAML file with these keys.")
    parser.add_argument("--model", type=str, default="smollm2-135m-instruct",
                        help="The base model: alias, local save_pretrained directory, or hub name.")
    parser.add_argument("--adapter", type=str, required=True,
                        help="Adapter directory (PEFT format), e.g. out/demo/export/adapter.")
    parser.add_argument("--out", type=str, required=True, help="Output directory (replaced whole if it exists).")
    parser.add_argument("--dtype", type=str, default="auto", help="Weight dtype of the base: auto, float32, bfloat16.")
    parser.add_argument("--quantize", type=Optional[QuantConfig], default=None,
                        help="Quantize the base first, as it was during QLoRA training.")
    parser.add_argument("--merge_base", type=Optional[MergeBaseName], default=None,
                        help="For a 4-bit base: dequantized (default), original or requantize.")
    return parser


def export_main(argv: Sequence[str]) -> ExportReport:
    """Run ``lightning-lora export`` with ``argv``; prints the export report."""
    parser = build_parser()
    args = parser.instantiate_classes(parser.parse_args(list(argv)))
    from lightning_lora.modules.loading import load_causal_lm
    from lightning_lora.surgery.io.adapter_files import load_adapter

    model, tokenizer = load_causal_lm(args.model, args.dtype)
    # "original" merges onto the full-precision weights: that is the base as loaded, never quantized.
    if args.quantize is not None and args.merge_base != "original":
        from lightning_lora.surgery.quant.quantize import quantize_model

        quantize_model(model, args.quantize)
    load_adapter(model, args.adapter)
    use_merge_base = args.merge_base and args.quantize is not None and args.merge_base != "original"
    kwargs = {"merge_base": args.merge_base} if use_merge_base else {}
    report = export_merged(model, args.out, tokenizer=tokenizer, **kwargs)
    sys.stdout.write(f"{report}\n")
    return report
