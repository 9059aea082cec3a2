"""A cache of what a pattern's kernel builds once per case (packed layouts, block masks, the
chunk length and head groups), readable from compiled code.

torch.compile cannot compare two pattern specs by value, and every attention layer reads a
spec object of its own. So a lookup goes first by the spec *object* (a plain dict read
keyed by ``id``, which dynamo traces without a graph break), then, outside any compiled
graph, by value, so that equal specs share one entry; a miss is built there too (building
reads tensors back to the host, which a graph cannot hold).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

import torch

from ..patterns.spec import PatternSpec

Plan = TypeVar("Plan")


class PlanCache(Generic[Plan]):
    """``build(spec, *case)`` results, the ``size`` newest kept (by value; by spec object 4x that)."""

    def __init__(self, build: Callable[..., Plan], size: int = 32):
        self._build, self._size = build, size
        self._by_value: OrderedDict = OrderedDict()
        self._by_spec: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: PatternSpec, *case) -> Plan:
        hit = self._by_spec.get((id(spec), *case))
        if hit is not None and hit[0] is spec:
            return hit[1]
        return self._cached_or_built(spec, case)

    @torch.compiler.disable  # compiled code finds a missing plan built eagerly (a graph break, once)
    def _cached_or_built(self, spec: PatternSpec, case: tuple) -> Plan:
        with self._lock:
            plan = self._by_value.get((spec, *case))
        if plan is None:
            plan = self._build(spec, *case)
        with self._lock:
            self._by_value[(spec, *case)] = plan
            self._by_value.move_to_end((spec, *case))
            self._by_spec[(id(spec), *case)] = (spec, plan)  # holding the spec keeps its id unique
            for cache, size in ((self._by_value, self._size), (self._by_spec, 4 * self._size)):
                while len(cache) > size:  # the oldest goes first
                    cache.popitem(last=False)
        return plan

    def __len__(self) -> int:
        return len(self._by_value)  # distinct cases

    def newest(self) -> Plan:
        """The plan last built or found by value (raises StopIteration when empty)."""
        return next(reversed(self._by_value.values()))

    def clear(self) -> None:
        with self._lock:
            self._by_value.clear()
            self._by_spec.clear()
