"""Name -> part registries: one per kind of part a config picks by name (rollout engines, discriminators,
rewards). A part registers itself with a decorator next to its definition, as Megatron-Bridge registers its
bridges and torchtitan its train specs; the config's ``Literal`` choices for that field list the same names
(tests/test_registries.py checks that they match)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Parts of one kind by name. ``get`` refuses an unknown name with the names it knows."""

    def __init__(self, kind: str, error: type[Exception] = ValueError) -> None:
        """``kind`` names the parts in messages ("rollout engine"); ``error`` is what a bad name raises."""
        self.kind, self.error = kind, error
        self._parts: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated class or factory the part called ``name``."""

        def add(part: T) -> T:
            self.add(name, part)
            return part

        return add

    def add(self, name: str, part: T) -> None:
        """Register ``part`` as ``name``; a name is registered once."""
        if name in self._parts:
            raise self.error(f"{self.kind} {name!r} is registered twice")
        self._parts[name] = part

    def get(self, name: str, where: str = "") -> T:
        """The part called ``name``; ``where`` (a config field) prefixes the message when it is unknown."""
        if name not in self._parts:
            prefix = f"{where}: " if where else ""
            raise self.error(f"{prefix}unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'}")
        return self._parts[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._parts)

    def __contains__(self, name: object) -> bool:
        return name in self._parts
