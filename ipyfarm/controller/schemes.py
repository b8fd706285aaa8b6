"""Load-balancing schemes: pure functions that pick one engine for a task.

Each takes the candidate engines that have room for another task (never empty) and
a ``random.Random``; it returns one of them. A candidate is anything shaped like a
:class:`Slot` (the controller passes its engine records): ``load`` is the engine's
outstanding task count, ``last_used`` the dispatch counter when it last got work
(a counter, not a clock), ``engine_id`` breaks ties.

==============  ====================================================================
``leastload``   fewest outstanding tasks; among equals, the least recently used
``lru``         the engine that got work longest ago (round robin, blind to run time)
``plainrandom`` uniformly at random
``twobin``      two engines at random, then the least recently used of the two
``weighted``    two engines drawn with weights 1/(1 + load), then the less loaded one
==============  ====================================================================
"""

from __future__ import annotations

import random
from bisect import bisect
from itertools import accumulate
from typing import Any, Callable, NamedTuple, Sequence

__all__ = ["SCHEMES", "Slot", "get_scheme"]


class Slot(NamedTuple):
    engine_id: int
    load: int
    last_used: int


def leastload(slots: Sequence[Any], rng: random.Random) -> Any:
    return min(slots, key=lambda s: (s.load, s.last_used, s.engine_id))


def lru(slots: Sequence[Any], rng: random.Random) -> Any:
    return min(slots, key=lambda s: (s.last_used, s.engine_id))


def plainrandom(slots: Sequence[Any], rng: random.Random) -> Any:
    return slots[rng.randrange(len(slots))]


def _two(n: int, rng: random.Random) -> tuple[int, int]:
    """Two distinct indices below ``n`` (n >= 2), uniformly."""
    a = rng.randrange(n)
    b = rng.randrange(n - 1)
    return a, b + (b >= a)


def twobin(slots: Sequence[Any], rng: random.Random) -> Any:
    if len(slots) == 1:
        return slots[0]
    a, b = _two(len(slots), rng)
    return lru([slots[a], slots[b]], rng)


def weighted(slots: Sequence[Any], rng: random.Random) -> Any:
    n = len(slots)
    if n == 1:
        return slots[0]
    # two draws with weights 1/(1 + load): cumulative weights and bisect, as
    # random.choices does, without its argument handling (a third of this scheme's cost)
    cum = list(accumulate([1.0 / (1 + s.load) for s in slots]))
    total, last, rnd = cum[-1], n - 1, rng.random
    a = slots[bisect(cum, rnd() * total, 0, last)]
    b = slots[bisect(cum, rnd() * total, 0, last)]
    if (b.load, b.last_used, b.engine_id) < (a.load, a.last_used, a.engine_id):
        return b
    return a


SCHEMES: dict[str, Callable[[Sequence[Any], random.Random], Any]] = {
    "leastload": leastload,
    "lru": lru,
    "plainrandom": plainrandom,
    "twobin": twobin,
    "weighted": weighted,
}


def get_scheme(name: str) -> Callable[[Sequence[Any], random.Random], Any]:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduling scheme {name!r}; choose one of {', '.join(SCHEMES)}"
        ) from None
