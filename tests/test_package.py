"""The top-level package: every public name resolves although nothing is imported until used."""

from __future__ import annotations

import lightning_lora


def test_every_public_name_resolves() -> None:
    for name in lightning_lora.__all__:
        assert getattr(lightning_lora, name) is not None, name
    assert lightning_lora.apply_lora is lightning_lora.surgery.apply_lora
    assert set(lightning_lora.__all__) <= set(dir(lightning_lora))
