"""What every ``lightning-lora`` parser shares: flat ``--lora.*`` keys and short errors."""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

from lightning_lora.cli.errors import CommandLineError, debug_enabled, short_parse_error


def use_flat_config_keys() -> None:
    """Parse ``LoRAConfig`` / ``QuantConfig`` as plain dataclasses: ``--lora.r 8``, not ``class_path``/``init_args``.

    jsonargparse treats a dataclass with a non-dataclass base (our ``ConfigDict`` mixin) as a class that may be
    subclassed, and then prints and expects ``class_path``/``init_args``. Nobody subclasses these configs.
    """
    from jsonargparse import set_parsing_settings

    from lightning_lora.surgery.lora.config import LoRAConfig
    from lightning_lora.surgery.quant.config import QuantConfig

    try:
        set_parsing_settings(subclasses_disabled=[LoRAConfig, QuantConfig])
    except TypeError:  # jsonargparse before the setting existed: the class_path form still parses
        pass


def config_field_options() -> list[str]:
    """``--lora.r``, ``--lora.targets``, ``--quantize.quant_type``...: the keys close matches are drawn from."""
    from lightning_lora.surgery.lora.config import LoRAConfig
    from lightning_lora.surgery.quant.config import QuantConfig

    return [f"--{prefix}.{f.name}" for prefix, cls in (("lora", LoRAConfig), ("quantize", QuantConfig))
            for f in dataclasses.fields(cls)]


def flat_keys_help(prefix: str, cls: type) -> str:
    """``--lora.r, --lora.alpha, ...``: the keys of a config dataclass, for ``--help``."""
    return ", ".join(f"--{prefix}.{f.name}" for f in dataclasses.fields(cls))


class ShortErrors:
    """Mixin for jsonargparse parsers: a parse error raises :class:`CommandLineError` with one or two lines.

    ``main`` prints it and exits with status 2, instead of the full usage that argparse prints.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Raise a short :class:`CommandLineError` (the full usage with ``LIGHTNING_LORA_DEBUG=1``)."""
        if not getattr(self, "exit_on_error", True) or debug_enabled():
            super().error(message, ex)  # type: ignore[misc]
        parser: Any = getattr(ex, "subcommand_parser", None) or self
        options = [*getattr(parser, "_option_string_actions", {}), *config_field_options()]
        raise CommandLineError(short_parse_error(message, options)) from ex
