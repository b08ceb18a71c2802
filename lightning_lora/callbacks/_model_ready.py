"""Run callback work right after the LightningModule's model exists and before the optimizer is built.

Lightning 2.6 ``fit`` calls ``Callback.setup -> LightningModule.setup -> configure_model -> (checkpoint restore) ->
strategy.setup (precision conversion, DDP wrap, configure_optimizers) -> on_fit_start``; no callback hook runs
between ``configure_model`` and the optimizer. Modules may build their model in ``__init__``, ``setup`` or
``configure_model``, so a callback's ``setup`` can be too early. We therefore wrap the module's ``configure_model``
(per instance) from ``setup``: Lightning calls it when it is overridden, and the wrapper counts as an override even
when the module has none. After the module's own ``configure_model`` the wrapper runs the registered actions, each
at most once per module, ordered by priority -- so callbacks compose in whichever order they are listed
(quantize + LoRA, then layer freezing, then activation checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_STATE_ATTR = "_lightning_lora_model_ready"

# Priorities: lower runs first.
LORA = 10
FREEZING = 20
CHECKPOINTING = 30
PRECISION = 40  # the built-in module's dtype="auto": casts what is frozen, so it runs after everything that freezes
SHARDING = 90  # FSDP2 last: it turns every parameter into a DTensor
LOAD_WEIGHTS = 95  # a model built on the meta device gets its (sharded) weights
IDENTITY = 99  # fingerprints of bases that were on the meta device during the surgery


def when_model_ready(pl_module: nn.Module, key: str, priority: int, action: Callable[[Any], None]) -> None:
    """Run ``action(pl_module)`` right after ``pl_module.configure_model()``, once per ``key`` and module.

    Args:
        pl_module: The LightningModule.
        key: Identifies the action; an action already run under this key never runs again on this module.
        priority: Lower runs first (see the constants above).
        action: The work, called with the module.
    """
    state = pl_module.__dict__.setdefault(_STATE_ATTR, {"actions": {}, "done": set()})
    state["actions"][key] = (priority, action)
    if "configure_model" not in pl_module.__dict__:
        original = pl_module.configure_model  # the class's method, bound

        def configure_model() -> None:  # not functools.wraps: Lightning must see an override
            original()
            run_pending(pl_module)

        pl_module.__dict__["configure_model"] = configure_model


def run_pending(pl_module: nn.Module) -> None:
    """Run the registered actions not run yet, by priority (also usable outside a Trainer)."""
    state = pl_module.__dict__.get(_STATE_ATTR)
    if not state:
        return
    for key, (_, action) in sorted(state["actions"].items(), key=lambda item: item[1][0]):
        if key not in state["done"]:
            action(pl_module)
            state["done"].add(key)


def forget(pl_module: nn.Module, key: str) -> None:
    """Unregister ``key`` (at teardown); the last one out restores the module's own ``configure_model``."""
    state = pl_module.__dict__.get(_STATE_ATTR)
    if not state:
        return
    state["actions"].pop(key, None)
    if not state["actions"]:
        pl_module.__dict__.pop("configure_model", None)


def target_module(pl_module: nn.Module, path: str | None) -> nn.Module:
    """``pl_module`` itself (``path`` None) or its submodule at ``path`` (e.g. ``"model"``, ``"model.backbone"``).

    Raises:
        ValueError: If there is no module at ``path`` (the message lists the module's children).
    """
    if path is None or path == "":
        return pl_module
    try:
        module = pl_module.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Module):
        children = [n for n, _ in pl_module.named_children()] or "none"
        raise ValueError(
            f"module={path!r}: {type(pl_module).__name__} has no submodule {path!r} (its submodules: {children}). "
            "If the model is built in configure_model, it does not exist before that. "
            "HINT: pass the attribute path of the network inside the LightningModule, e.g. module=\"model\", or "
            "module=None to use the LightningModule itself."
        )
    return module
