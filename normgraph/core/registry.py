"""A named table that users extend by registration, and that tests can extend for a while.

Every extensible table in normgraph (kinds, orthogonalizers, atom/bond/scale/module rules)
is one of these, so "what does normgraph know about X" is one lookup, registration is the
only way to write, and ``with table.scoped(): ...`` undoes a test's registrations instead
of popping module globals by hand.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class UnknownEntry(ValueError, KeyError):
    """A name that is not registered: a ValueError (a bad argument) and a KeyError (a lookup)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(dict, Generic[K, V]):  # type: ignore[type-arg]
    """A dict with a name (for error messages), `register` and a `scoped` undo."""

    def __init__(self, what: str, *, check: Callable[[K, V], None] | None = None) -> None:
        super().__init__()
        self.what = what
        self._check = check

    def register(self, key: K, value: V) -> V:
        """Add or replace `key`; the table's check (if any) runs first and raises on bad entries."""
        if self._check is not None:
            self._check(key, value)
        self[key] = value
        return value

    def lookup(self, key: K, hint: str = "") -> V:
        """The entry for `key`, or an `UnknownEntry` error that lists what is registered."""
        try:
            return self[key]
        except KeyError:
            known = ", ".join(sorted(map(str, self)))
            raise UnknownEntry(f"unknown {self.what} {key!r}; registered: {known}" + (f". {hint}" if hint else "")) from None

    @contextlib.contextmanager
    def scoped(self) -> Iterator["Registry[K, V]"]:
        """Registrations made inside the block are undone at its end (replaced entries restored)."""
        saved = dict(self)
        try:
            yield self
        finally:
            self.clear()
            self.update(saved)
