"""Name -> factory registries: every extension point (models, datasets, partitioners, codecs,
strategies, plugins) is one of these, so a user's addition is one decorated function or class."""

from __future__ import annotations

from importlib import import_module
from typing import Callable, Generic, Iterator, TypeVar

from fl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of factories; registering a name twice is an error, as in torchvision."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}
        self._declared: dict[str, str] = {}  # name -> module that registers it when imported

    def declare(self, name: str, module: str) -> None:
        """``name`` is registered by importing ``module``, which happens on its first lookup: a
        heavy extension (captum for XDelta) costs nothing to a run that does not use it."""
        self._declared[name] = module

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._declared:
            import_module(self._declared[name])
        try:
            return self._entries[name]
        except KeyError:
            allowed = ", ".join(sorted(self._entries))
            raise ConfigError(self.config_key, f"unknown {self.kind} {name!r}; allowed: {allowed}") from None

    def names(self) -> list[str]:
        return sorted({*self._entries, *self._declared})

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._declared

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
