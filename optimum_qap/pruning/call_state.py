"""Per-call pruning state. One model may serve many threads at once (a web server, a batch worker pool), so what a
call captures from the vision tower, the fusion values a sweep tries, and whether pruning is switched off live in
the calling thread's context (`contextvars`: every thread starts with its own), never on the shared model.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

from torch import nn

_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("qap_pruning_disabled", default=frozenset())
_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("qap_fusion_overrides", default={})  # noqa: B039
_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qap_vision_capture", default=None)
_HOOKS_ATTRIBUTE = "_qap_capture_hooks"
_HOOKS_LOCK = threading.Lock()


@contextlib.contextmanager
def disabled(key: int) -> Iterator[None]:
    """Pruning of the model identified by ``key`` is off for this thread inside the block."""
    token = _DISABLED.set(_DISABLED.get() | {key})
    try:
        yield
    finally:
        _DISABLED.reset(token)


def is_disabled(key: int) -> bool:
    return key in _DISABLED.get()


def override(key: int, name: str):
    """This thread's override of ``name`` ("alpha" or "outlier_slots") for the model ``key``, or None."""
    return _OVERRIDES.get().get((key, name))


def set_override(key: int, name: str, value) -> None:
    """Set (None: clear) this thread's override; a new dict each time, so other threads never see it change."""
    overrides = {k: v for k, v in _OVERRIDES.get().items() if k != (key, name)}
    if value is not None:
        overrides[(key, name)] = value
    _OVERRIDES.set(overrides)


class PerThreadOverride:
    """A pruner attribute whose value (default None) belongs to the calling thread, for the pruner's model."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, pruner, owner=None):
        return self if pruner is None else override(pruner.key, self.name)

    def __set__(self, pruner, value) -> None:
        set_override(pruner.key, self.name, value)


@contextlib.contextmanager
def capturing() -> Iterator[dict]:
    """Collect what the capture hooks see during this thread's vision forward."""
    store: dict = {}
    token = _CAPTURE.set(store)
    try:
        yield store
    finally:
        _CAPTURE.reset(token)


def capture_store() -> dict | None:
    """The calling thread's capture, inside `capturing`; None outside."""
    return _CAPTURE.get()


def _capture_input(_module, args, kwargs) -> None:
    store = _CAPTURE.get()
    if store is not None:
        store["input"] = args[0] if args else kwargs["hidden_states"]


def _capture_output(_module, _args, output) -> None:
    store = _CAPTURE.get()
    if store is not None:
        store["output"] = output[0] if isinstance(output, tuple) else output


def ensure_capture_hooks(layer: nn.Module) -> None:
    """Register, once per layer, the hooks that hand its input and output to the calling thread's capture."""
    if getattr(layer, _HOOKS_ATTRIBUTE, None) is not None:
        return
    with _HOOKS_LOCK:
        if getattr(layer, _HOOKS_ATTRIBUTE, None) is None:
            handles = (layer.register_forward_pre_hook(_capture_input, with_kwargs=True),
                       layer.register_forward_hook(_capture_output))
            setattr(layer, _HOOKS_ATTRIBUTE, handles)
