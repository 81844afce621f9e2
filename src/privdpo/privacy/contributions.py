"""Contribution bounds: how many units (examples or pairs) each user keeps.

User-level DP (ELS and ULS, `planning.py`) first caps every user at k units, a random k of
theirs seeded by the run's seed, so that one user's influence is bounded by construction.
"""

from __future__ import annotations

import hashlib
import numbers
import random
from collections.abc import Sequence


def _check_bound(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{name} (the contribution bound) must be an integer >= 1, got {k!r}")
    return int(k)


def units_per_user(user_of_unit: Sequence[str]) -> dict[str, int]:
    """Number of units of each user, in order of first appearance."""
    out: dict[str, int] = {}
    for user in user_of_unit:
        out[user] = out.get(user, 0) + 1
    return out


def _user_rng(user: str, seed: int) -> random.Random:
    """A generator that depends only on (seed, user): SHA-256, not Python's salted hash()."""
    digest = hashlib.sha256(f"{seed}\x00{user}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def cap_contributions(user_of_unit: Sequence[str], k: int, seed: int) -> list[int]:
    """Indices of the units kept when each user is capped at k units (Charles et al. 2024).

    user_of_unit: the user id (a string) of each unit, by unit index.
    Each user keeps all of its units if it has at most k, otherwise a uniformly random
    k-subset of them. The choice for a user depends only on (seed, user id, that user's
    unit indices), so it is the same in every process and unaffected by other users.
    Returns the kept indices in increasing order.
    """
    k = _check_bound(k)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    by_user: dict[str, list[int]] = {}
    for index, user in enumerate(user_of_unit):
        if not isinstance(user, str):
            raise ValueError(
                f"user ids must be strings, got {type(user).__name__} {user!r} for unit {index}"
            )
        by_user.setdefault(user, []).append(index)
    kept: list[int] = []
    for user, indices in by_user.items():
        if len(indices) <= k:
            kept.extend(indices)
        else:
            kept.extend(_user_rng(user, int(seed)).sample(indices, k))
    return sorted(kept)
