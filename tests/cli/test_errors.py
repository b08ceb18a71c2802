"""Short parse errors from real jsonargparse messages, and the argument rewriting for negative slices."""

from __future__ import annotations

from typing import Optional

import pytest
from jsonargparse import ArgumentParser

from lightning_lora.cli.errors import CommandLineError, rewrite_slices
from lightning_lora.cli.parsing import ShortErrors, use_flat_config_keys
from lightning_lora.surgery.lora.config import LoRAConfig


class _Parser(ShortErrors, ArgumentParser):
    """The mixin the CLI's parsers use."""


@pytest.fixture(scope="module")
def parser() -> ArgumentParser:
    use_flat_config_keys()
    parser = _Parser(prog="test")
    parser.add_argument("--lora", type=Optional[LoRAConfig], default=LoRAConfig())
    parser.add_argument("--batch_size", type=int, default=1)
    return parser


@pytest.mark.parametrize(("args", "message"), [
    (["--lora.bias", "some"], "--lora.bias: expected one of 'none', 'all', 'lora_only', got 'some'"),
    (["--batch_size", "abc"], "--batch_size: expected a value of type int, got 'abc'"),
    (["--lora.rank", "8"], "unknown option --lora.rank; did you mean --lora.r? (see --help for the valid options)"),
    (["--batch_sise", "3"], "unknown option --batch_sise; did you mean --batch_size? (see --help for the valid options)"),
    (["--colour", "red"], "unknown option --colour (see --help for the valid options)"),
], ids=["literal", "int", "misspelt-nested", "misspelt", "unknown"])
def test_parse_errors_are_one_line(parser: ArgumentParser, args: list[str], message: str) -> None:
    with pytest.raises(CommandLineError) as info:
        parser.parse_args(args)
    assert str(info.value) == message


def test_flat_keys_parse_to_a_plain_mapping(parser: ArgumentParser) -> None:
    config = parser.parse_args(["--lora.r", "4", "--lora.targets", "all-linear"])
    assert "class_path" not in parser.dump(config)
    assert parser.instantiate(config).lora == LoRAConfig(r=4, targets="all-linear")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--lora.layers", "-8:"], ['--lora.layers="-8:"']),
    (["--lora.layers=-8:"], ['--lora.layers="-8:"']),
    (["--lora.layers", "0:4", "--lora.r", "8"], ['--lora.layers="0:4"', "--lora.r", "8"]),
    (["--lora.layers", "[28, 29]"], ["--lora.layers", "[28, 29]"]),  # a list stays a list
    (["--lora.r", "-8:"], ["--lora.r", "-8:"]),  # only *layers options
])
def test_slices_are_quoted_before_argparse_sees_them(argv: list[str], expected: list[str]) -> None:
    assert rewrite_slices(argv) == expected
