"""The privacy ledger: every DP-SGD step a run took, and what they compose to.

A checkpoint stores the ledger, so a resumed run continues the same accounting; the
statement (`statement.py`) and `privdpo privacy verify` read it back from `privacy.json`.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field

import dp_accounting

from privdpo.privacy.accounting import (
    PRIVACY_UNITS,
    _check_accountant,
    _check_delta,
    _check_noise_multiplier,
    _check_sampling_rate,
    _check_steps,
    _check_target_epsilon,
    _composed_epsilon,
    _largest_steps_within,
    _make_accountant,
    dpsgd_event,
)
from privdpo.privacy.els_accounting import els_composed_epsilon, els_step_event


@dataclass
class PrivacyLedger:
    """Everything needed to rebuild the accountant exactly: the DP-SGD steps taken so far.

    unit: the privacy unit, one of PRIVACY_UNITS ("example", "pair", "user"); the
        neighbouring relation is add/remove of one such unit.
    delta: the delta at which epsilon is reported.
    accountant: one of ACCOUNTANTS.
    segments: [[sampling_rate, noise_multiplier, steps], ...] in the order run;
        consecutive steps with equal (sampling_rate, noise_multiplier) share a segment.
    els_bound: None for DP-SGD with `unit` as the privacy unit. An integer k >= 1 for
        user-level DP with example-level sampling (ELS, Charles et al. 2024): units are
        sampled at `sampling_rate`, each user holds at most k of them, and every step is
        accounted as `els_accounting.els_step_event` (a mixture of Gaussians over
        Binomial(k, q) sampled units); unit must then be "user" and accountant "pld".
    """

    unit: str
    delta: float
    accountant: str = "pld"
    segments: list[list] = field(default_factory=list)
    els_bound: int | None = None

    def __post_init__(self) -> None:
        if self.unit not in PRIVACY_UNITS:
            raise ValueError(f"unit must be one of {PRIVACY_UNITS}, got {self.unit!r}")
        self.delta = _check_delta(self.delta)
        _check_accountant(self.accountant)
        checked = []
        for segment in self.segments:
            if not isinstance(segment, (list, tuple)) or len(segment) != 3:
                raise ValueError(
                    "segments must be [sampling_rate, noise_multiplier, steps] triples, "
                    f"got {segment!r}"
                )
            q, sigma, steps = segment
            checked.append(
                [_check_sampling_rate(q), _check_noise_multiplier(sigma), _check_steps(steps)]
            )
        self.segments = checked
        if self.els_bound is not None:
            k = self.els_bound
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(f"els_bound must be None or an integer >= 1, got {k!r}")
            self.els_bound = int(k)
            if self.unit != "user":
                raise ValueError(
                    f"els_bound={k} accounts for users (each holding at most {k} units), so "
                    f"unit must be 'user', got {self.unit!r}; drop els_bound for "
                    f"{self.unit}-level DP-SGD"
                )
            if self.accountant != "pld":
                raise ValueError(
                    f"els_bound needs accountant='pld' (the ELS step is a mixture of "
                    f"Gaussians, which only the PLD accountant measures), got "
                    f"{self.accountant!r}"
                )

    def record_step(self, sampling_rate: float, noise_multiplier: float) -> None:
        """Record one DP-SGD step taken with this sampling rate and noise multiplier."""
        q = _check_sampling_rate(sampling_rate)
        sigma = _check_noise_multiplier(noise_multiplier)
        if self.segments and self.segments[-1][0] == q and self.segments[-1][1] == sigma:
            self.segments[-1][2] += 1
        else:
            self.segments.append([q, sigma, 1])

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(segment[2] for segment in self.segments)

    def key(self) -> tuple[tuple[float, float, int], ...]:
        """The segments as a hashable tuple: what epsilon is a function of."""
        return tuple((q, sigma, steps) for q, sigma, steps in self.segments)

    def key_after(self, more: int, sampling_rate: float, noise_multiplier: float) -> tuple:
        """The key this ledger will have after `more` steps with (q, sigma) are recorded."""
        segments = [list(s) for s in self.segments]
        if more > 0:
            if (
                segments
                and segments[-1][0] == sampling_rate
                and segments[-1][1] == noise_multiplier
            ):
                segments[-1][2] += more
            else:
                segments.append([sampling_rate, noise_multiplier, more])
        return tuple(tuple(s) for s in segments)

    def epsilon_of_key(self, key: tuple) -> float:
        """Epsilon of a `key` (or `key_after`) at this ledger's delta and accountant."""
        return self._epsilon_of(key)

    def _epsilon_of(self, segments: tuple[tuple[float, float, int], ...]) -> float:
        if self.els_bound is None:
            return _composed_epsilon(segments, self.delta, self.accountant)
        return els_composed_epsilon(segments, self.els_bound, self.delta)

    def epsilon(self) -> float:
        """Epsilon at `delta` of all segments composed (a ComposedDpEvent of `dpsgd_event`s,
        or of ELS mixture-of-Gaussians steps when `els_bound` is set).

        0.0 with no steps, inf if any step had noise_multiplier == 0. Cached by the tuple
        of segments: a repeated call costs nothing, a call after a new step costs one
        accountant run (about 0.05 s for 10k steps with PLD; with els_bound the one-step
        PLD is cached too, so a new step costs one composition).
        """
        return self._epsilon_of(self.key())

    def max_more_steps(
        self, sampling_rate: float, noise_multiplier: float, target_epsilon: float
    ) -> int:
        """How many more steps with (sampling_rate, noise_multiplier) keep epsilon <= target.

        Accounts for the segments already recorded (e.g. on resume), so a recipe can stop
        before the run would cross its budget.
        """
        q = _check_sampling_rate(sampling_rate)
        sigma = _check_noise_multiplier(noise_multiplier)
        target_epsilon = _check_target_epsilon(target_epsilon)
        key = self.key()
        if self._epsilon_of(key) > target_epsilon:
            return 0
        return _largest_steps_within(
            lambda n: self._epsilon_of(key + ((q, sigma, n),)), target_epsilon
        )

    def events(self) -> list:
        """The dp-accounting events of the recorded steps, one per segment: what the
        epsilon is the composition of (`privdpo privacy verify` recomputes from these)."""
        out = []
        for q, sigma, steps in self.segments:
            if steps == 0:
                continue
            if self.els_bound is None or self.els_bound == 1:
                # Binomial(1, q) mixture = the Poisson-subsampled Gaussian, exactly: the
                # accountant measures it so (els_accounting), and so does verify.
                out.append(dpsgd_event(q, sigma, steps))
            else:
                out.append(
                    dp_accounting.SelfComposedDpEvent(
                        els_step_event(q, sigma, self.els_bound), steps
                    )
                )
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict; `from_dict` rebuilds an equal ledger."""
        return {
            "unit": self.unit,
            "delta": self.delta,
            "accountant": self.accountant,
            "segments": copy.deepcopy(self.segments),
            "els_bound": self.els_bound,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyLedger:
        """The ledger `to_dict` wrote; rejects missing or unknown keys.

        "els_bound" may be absent (ledgers written before it existed): it is then None.
        """
        required = {"unit", "delta", "accountant", "segments"}
        allowed = required | {"els_bound"}
        if not required <= set(d) <= allowed:
            raise ValueError(
                f"privacy ledger must have keys {sorted(required)} (and optionally "
                f"'els_bound'), got {sorted(d)} (missing {sorted(required - set(d))}, "
                f"unknown {sorted(set(d) - allowed)})"
            )
        return cls(
            unit=d["unit"],
            delta=d["delta"],
            accountant=d["accountant"],
            segments=copy.deepcopy(d["segments"]),
            els_bound=d.get("els_bound"),
        )


def composition_accountant(ledgers: list[PrivacyLedger]) -> str:
    """The accountant `composed_epsilon` uses: the stages' own when they share one and none
    has ELS steps, else PLD (the only one that measures ELS's mixture of Gaussians)."""
    accountants = {led.accountant for led in ledgers}
    if len(accountants) == 1 and all(led.els_bound is None for led in ledgers):
        return accountants.pop()
    return "pld"


def composed_epsilon(ledgers: list[PrivacyLedger], delta: float) -> float:
    """Epsilon at `delta` of several stages' mechanisms run one after another on the same
    units (sequential composition): the dp-accounting composition of every stage's
    events, never a sum of epsilons. DP-SGD stages with one accountant compose in that
    accountant (exactly as one ledger of all their segments would); a stage with ELS
    steps puts the whole composition in the PLD accountant."""
    delta = _check_delta(delta)
    if any(sigma == 0 for led in ledgers for _, sigma, steps in led.segments if steps):
        return math.inf
    accountant = composition_accountant(ledgers)
    if all(led.els_bound is None for led in ledgers):
        segments = tuple(tuple(s) for led in ledgers for s in led.segments)
        return _composed_epsilon(segments, delta, accountant)
    events = [e for led in ledgers for e in led.events()]
    composed = dp_accounting.ComposedDpEvent(events)
    return float(_make_accountant("pld").compose(composed).get_epsilon(delta))
