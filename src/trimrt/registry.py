"""Named registries: methods and encodings register themselves where they are defined.

A `Registry` maps names (the words a recipe uses) to classes. The modules that define
the entries are named at construction and imported on the first lookup, so the recipe
can validate a method name without importing graph code at import time, and adding a
method is adding one registered class, with no `if/elif` over names anywhere.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> entry, filled by `@registry.register("name")` in the `providers` modules."""

    def __init__(self, what: str, providers: tuple[str, ...] = ()) -> None:
        self.what = what
        self._providers = providers
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def _load(self) -> None:
        for module in self._providers:  # imported once; later calls find it in sys.modules
            importlib.import_module(module)

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; choose one of {list(self._entries)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


#: [token_pruning] method = "..." -> its class (trimrt.passes.pruning_methods)
TOKEN_PRUNING_METHODS: Registry = Registry("token pruning method", ("trimrt.passes.pruning_methods",))
#: [quantization] method = "..." -> its class (trimrt.quantization.methods)
QUANTIZATION_METHODS: Registry = Registry("quantization method", ("trimrt.quantization.methods",))
#: how a quantized MatMul is written in ONNX for a target -> its builder (trimrt.quantization.encodings)
QUANTIZED_ENCODINGS: Registry = Registry("quantized encoding", ("trimrt.quantization.encodings",))
