"""Patching a user's object at runtime and restoring it exactly: the one install/uninstall mechanism.

The ``PEFT`` callback runs its injection right after the module's ``configure_model``, ``Distillation``
wraps ``training_step`` and ``FeatureCache`` wraps ``forward``. Each installs a :class:`Patch` with
:func:`patch_method` and calls :meth:`Patch.restore` at teardown (or leaves a ``with`` block): the
object then holds exactly what it held before -- its own attribute back, or no instance attribute at
all when the method came from its class -- even when several patches on one attribute are restored
out of order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["Patch", "patch_method"]

_MISSING = object()
_PATCH_ATTR = "__lightning_peft_patch__"


class Patch:
    """``setattr(obj, name, value)`` that :meth:`restore` undoes exactly (idempotent; also a context manager).

    Args:
        obj: an instance (the value becomes an instance attribute) or a class.
        name: the attribute.
        value: what to put there.
    """

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj = obj
        self.name = name
        self.value = value
        self.previous = vars(obj).get(name, _MISSING)  # the object's own attribute, not one found on its class
        self.active = True
        setattr(obj, name, value)

    def restore(self) -> None:
        """Put back what ``obj`` held before (a no-op once restored).

        When another patch was installed on top of this one, it stays in place and its own
        ``restore`` later skips this one; this patch's value then only forwards to what it replaced.
        """
        if not self.active:
            return
        self.active = False
        if vars(self.obj).get(self.name, _MISSING) is not self.value:
            return  # patched again on top: that patch unwinds past this one when it is restored
        previous = self.previous
        while getattr(previous, _PATCH_ATTR, None) is not None and not getattr(previous, _PATCH_ATTR).active:
            previous = getattr(previous, _PATCH_ATTR).previous  # a patch underneath was restored out of order
        if previous is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, previous)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def patch_method(obj: Any, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Patch:
    """Replace method ``name`` of ``obj`` by ``wrapper(original)``, where ``original`` is the bound method now in place.

    Once the patch is restored, a reference to the patched function still held somewhere (or a patch
    installed on top of it) calls ``original`` directly.

    Example:
        >>> class Net:
        ...     def forward(self, x): return x + 1
        >>> net = Net()
        >>> with patch_method(net, "forward", lambda original: lambda x: 2 * original(x)):
        ...     net.forward(1)
        4
        >>> net.forward(1), "forward" in vars(net)
        (2, False)
    """
    original = getattr(obj, name)
    patched_impl = wrapper(original)
    patch: Patch | None = None

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return (patched_impl if patch is not None and patch.active else original)(*args, **kwargs)

    setattr(patched, _PATCH_ATTR, None)
    patch = Patch(obj, name, patched)
    setattr(patched, _PATCH_ATTR, patch)
    return patch
