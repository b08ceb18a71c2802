"""``lightning-lora serve``: one base model, many LoRA adapters, behind vLLM's OpenAI-compatible API.

Examples:
    lightning-lora serve --model smollm2-135m-instruct --adapters dates=out/demo/adapter --port 8000
    lightning-lora serve --model out/merged --adapters a=ad/a b=ad/b --api_key secret --adapter_root ad
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from jsonargparse import ArgumentParser

log = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    """The ``serve`` command's arguments."""
    from lightning_lora.surgery.quant.config import QuantConfig

    parser = ArgumentParser(prog="lightning-lora serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="config", help="A YAML file with these keys.")
    parser.add_argument("--model", type=str, default="smollm2-135m-instruct",
                        help="The base model: alias, local save_pretrained directory, or hub name.")
    parser.add_argument("--adapters", type=str, default=[], nargs="*",
                        help="Adapters to load at start, as NAME=PATH (PEFT adapter directories).")
    parser.add_argument("--served_model_name", type=str | None, default=None,
                        help="The `model` value that selects the bare base model. Default: the --model value.")
    parser.add_argument("--dtype", type=str, default="auto", help="Weight dtype of the base: auto, float32, bfloat16.")
    parser.add_argument("--quantize", type=QuantConfig | None, default=None,
                        help="Quantize the base to 4 bits first (serve QLoRA adapters from the base they trained on).")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="Address to bind: 127.0.0.1 (this machine only), 0.0.0.0 or ::.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--max_batch_size", type=int, default=16, help="Most requests decoded together (1: no batching).")
    parser.add_argument("--batch_timeout", type=float, default=0.01,
                        help="Seconds an idle server waits for more requests before it starts decoding.")
    parser.add_argument("--api_key", type=str | None, default=None,
                        help="Require 'Authorization: Bearer <key>' on every endpoint but /health.")
    parser.add_argument("--adapter_root", type=str | None, default=None,
                        help="Only read adapters from directories inside this one (start-up and load_lora_adapter).")
    parser.add_argument("--log_level", type=str, default="info", help="Server log level: debug, info, warning, error.")
    return parser


def parse_adapters(items: Sequence[str]) -> dict[str, str]:
    """``["a=path/a", "b=path/b"]`` -> ``{"a": "path/a", "b": "path/b"}``.

    Raises:
        ValueError: If an item is not ``NAME=PATH`` or a name repeats.
    """
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapters item {item!r} is not NAME=PATH; e.g. --adapters dates=out/demo/adapter")
        if name in adapters:
            raise ValueError(f"--adapters: the name {name!r} is given twice ({adapters[name]!r} and {path!r})")
        adapters[name] = path
    return adapters


def serve_main(argv: list[str]) -> None:
    """Run ``lightning-lora serve`` with ``argv`` until Ctrl+C."""
    parser = build_parser()
    args = parser.instantiate_classes(parser.parse_args(list(argv)))
    from lightning_lora.serve.errors import ServeError
    from lightning_lora.serve.server import ServeConfig, run_server

    try:
        config = ServeConfig(model=args.model, adapters=parse_adapters(args.adapters),
                             served_model_name=args.served_model_name, dtype=args.dtype, quantize=args.quantize,
                             max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
                             api_key=args.api_key, adapter_root=args.adapter_root)
        run_server(config, host=args.host, port=args.port, log_level=args.log_level)
    except (ServeError, ValueError, FileNotFoundError) as err:
        parser.error(str(err))
