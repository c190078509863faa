"""``Registry``: one name -> object table type behind every padnet registry.

Criteria, schedules, recipes, zoo models and converters are each a
:class:`Registry`; they all behave the same way:

- ``register(name, obj)`` adds ``obj`` and returns it; ``register(name)``
  returns a decorator doing the same. Registering a name that is taken by a
  *different* object raises ``ValueError`` unless ``overwrite=True``;
  registering the same object again is a no-op.
- ``unregister(name)`` removes and returns the entry; a missing name raises
  ``KeyError`` listing the registered names.
- ``get(name)`` / ``registry[name]`` return the entry; an unknown name raises
  :class:`UnknownNameError` (a ``KeyError`` and a ``ValueError``) whose message
  lists the registered names.
- ``names()`` is the sorted list of names; ``name in registry``, ``len``,
  iteration and the rest of the read-only ``Mapping`` API work as for a dict.

This module imports nothing from padnet (bottom layer, with ``_version``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable, Generic, TypeVar, overload

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")
_MISSING = object()


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. Both a ``KeyError`` (mapping lookup) and a
    ``ValueError`` (bad argument value), so either ``except`` catches it."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """A named table of ``kind`` objects (``Registry("criterion", plural="criteria")``).

    Args:
        kind: what one entry is, used in messages (``"criterion"``, ``"model"``).
        plural: plural of ``kind`` for messages (default ``kind + "s"``).
        check: optional ``check(name, obj)`` run before an entry is added; it
            raises (``TypeError`` / ``ValueError``) to refuse the object.
    """

    def __init__(self, kind: str, *, plural: str | None = None,
                 check: Callable[[str, T], None] | None = None) -> None:
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"Registry kind must be a non-empty string, got {kind!r}")
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._check = check
        self._entries: dict[str, T] = {}

    # ---- writing ---------------------------------------------------------------------------
    @overload
    def register(self, name: str, obj: None = None, *, overwrite: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    def register(self, name, obj=None, *, overwrite=False):
        """Add ``obj`` under ``name`` and return it; without ``obj``, return a decorator.

        Raises ``TypeError`` for a name that is not a non-empty string and
        ``ValueError`` when ``name`` holds a different object and ``overwrite``
        is false. Registering the very same object again changes nothing.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(o: T) -> T:
            if self._check is not None:
                self._check(name, o)
            current = self._entries.get(name)
            if name in self._entries and current is not o and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its object; ``KeyError`` (listing the names) if absent."""
        if name not in self._entries:
            raise UnknownNameError(f"{self.kind} {name!r} is not registered; {self._listing()}")
        return self._entries.pop(name)

    # ---- reading ---------------------------------------------------------------------------
    def get(self, name: str, default: object = _MISSING) -> T:  # type: ignore[override]
        """The object registered as ``name``.

        An unknown name raises :class:`UnknownNameError` listing the registered
        names, unless ``default`` is given (then it is returned, as ``dict.get``).
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: unhashable name
            if default is not _MISSING:
                return default  # type: ignore[return-value]
            raise UnknownNameError(f"unknown {self.kind} {name!r}; {self._listing()}") from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"

    def _listing(self) -> str:
        return f"registered {self.plural}: {', '.join(self.names()) or '(none)'}"
