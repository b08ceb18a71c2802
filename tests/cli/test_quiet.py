"""The CLI's noise filters drop the exact messages they name and nothing else from the same sources."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest

from lightning_lora.cli.quiet import quiet_known_noise


@pytest.fixture
def restore_filters() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "bitsandbytes.backends.cpu.ops")]
    saved = [list(logger.filters) for logger in loggers]
    with warnings.catch_warnings():
        yield
    for logger, filters in zip(loggers, saved, strict=True):
        logger.filters[:] = filters


def _warn_from(module: str, message: str, category: type[Warning]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()  # after simplefilter: the CLI installs its filters last too
        warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)
    return [str(w.message) for w in caught]


def test_named_warnings_are_dropped_and_others_kept(restore_filters: None) -> None:
    pytree = "lightning.pytorch.utilities._pytree"
    hf = "transformers.modeling_utils"
    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    assert _warn_from(pytree, leaf, FutureWarning) == []
    assert _warn_from(hf, "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning) == []
    assert _warn_from(pytree, "some other deprecation", FutureWarning) == ["some other deprecation"]
    assert _warn_from(hf, "`use_cache=True` is incompatible", UserWarning) == ["`use_cache=True` is incompatible"]
    assert _warn_from("my_code", leaf, FutureWarning) == [leaf]  # the same text from elsewhere is kept


def test_named_log_lines_are_dropped_and_others_kept(restore_filters: None, caplog: pytest.LogCaptureFixture) -> None:
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.INFO):
        lightning.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
        lightning.info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no trust")
        lightning.info("GPU available: False, used: False")
        bnb.warning("Some real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False", "Some real bitsandbytes problem"]
    assert sum(isinstance(f, logging.Filter) and type(f).__name__ == "_DropMessages" for f in lightning.filters) == 1
