"""The empirical privacy audit: canaries in one training run, and a lower bound on epsilon.

Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run": m canaries,
each included in the training data independently with probability 1/2. After training,
the auditor scores every canary, guesses "in" for the k+ highest scores and "out" for the
k- lowest, abstains on the rest, and counts its correct guesses. Under (epsilon, delta)-
DP no guesser does much better than randomized response: for r guesses, the number of
correct ones W satisfies (their Theorem 5.2)

    P[W >= v] <= beta + 2 m delta alpha,
    beta  = P[Binomial(r, p) >= v],      p = e^eps / (1 + e^eps),
    alpha = max over i = 1..v of  P[v - i <= Binomial(r, p) < v] / i.

The empirical lower bound is the largest epsilon this rules out at the given confidence:
the largest eps with P[W >= v] <= 1 - confidence for the observed v. A bound above the
proven epsilon means the implementation leaks more than its accounting says: a bug.

Choosing k+ and k- by looking at the same guesses would void the confidence level, so
they are chosen on a held-out half of the canaries (`choose_and_bound`): the grid of
(k+, k-) is tried on one half, the best is applied once to the other half, whose bound is
reported together with two maxima: the bound if those guesses were all right, and the
largest bound that half could give at all (every one of its canaries guessed right).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] under (epsilon, delta)-DP with m
    canaries (Theorem 5.2 of Steinke, Nasr and Jagielski 2023, see the module doc)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    binomial = stats.binom(r, p)
    beta = float(binomial.sf(v - 1))
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        bands = binomial.cdf(v - 1) - binomial.cdf(v - i - 1)  # P[v - i <= B < v]
        alpha = float(np.max(bands / i))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE, upper: float = 100.0
) -> float:
    """The largest epsilon whose p-value for (m, r, v) is at most 1 - confidence (0 when
    even epsilon = 0 is not ruled out), by bisection: the p-value grows with epsilon."""
    level = 1 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    lo, hi = 0.0, upper
    if p_value(m, r, v, hi, delta) <= level:
        return hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return lo


def guesses(scores: list[float], k_in: int, k_out: int) -> dict[int, bool]:
    """index -> guessed membership: True for the k_in highest scores, False for the k_out
    lowest (ties broken by index), nothing for the rest."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    out = {i: False for i in order[:k_out]}
    out.update({i: True for i in order[len(order) - k_in :]})
    return out


@dataclass
class AuditResult:
    canaries: int  # m, all of them
    evaluated: int  # the half the bound is computed on
    k_in: int
    k_out: int
    guesses: int  # r
    correct: int  # v
    epsilon_lower_bound: float
    attainable_with_chosen_guesses: float  # the bound if these r guesses were all right
    max_attainable: float  # the bound if every evaluated canary were guessed right
    confidence: float
    delta: float


def split_halves(m: int, seed: int) -> tuple[list[int], list[int]]:
    """Canary indices split at random (seeded): the half (k+, k-) are chosen on, and the
    half the bound is computed on."""
    order = list(range(m))
    random.Random(f"privdpo-audit-split-{seed}").shuffle(order)
    return order[: m // 2], order[m // 2 :]


def choose_and_bound(
    scores: list[float],
    included: list[bool],
    delta: float,
    seed: int,
    confidence: float = CONFIDENCE,
) -> AuditResult:
    """Pick (k+, k-) on a seeded half of the canaries, bound epsilon on the other half."""
    m = len(scores)
    pick, judge = split_halves(m, seed)

    def bound_on(indices, k_in, k_out):
        g = guesses([scores[i] for i in indices], k_in, k_out)
        correct = sum(1 for j, guess in g.items() if included[indices[j]] == guess)
        return correct, epsilon_lower_bound(len(indices), len(g), correct, delta, confidence)

    best = (0.0, 1, 1)
    for frac in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
        k = max(1, int(frac * len(pick) / 2))
        for k_in, k_out in ((k, k), (k, 0), (0, k)):
            if k_in + k_out == 0:
                continue
            _, eps = bound_on(pick, k_in, k_out)
            if eps > best[0]:
                best = (eps, k_in, k_out)
    _, k_in, k_out = best
    scale = len(judge) / max(1, len(pick))
    k_in, k_out = round(k_in * scale), round(k_out * scale)
    correct, eps = bound_on(judge, k_in, k_out)
    r = k_in + k_out
    return AuditResult(
        canaries=m,
        evaluated=len(judge),
        k_in=k_in,
        k_out=k_out,
        guesses=r,
        correct=correct,
        epsilon_lower_bound=eps,
        attainable_with_chosen_guesses=epsilon_lower_bound(len(judge), r, r, delta, confidence),
        max_attainable=epsilon_lower_bound(len(judge), len(judge), len(judge), delta, confidence),
        confidence=confidence,
        delta=delta,
    )


def inclusion(m: int, seed: int) -> list[bool]:
    """Each canary in the training data independently with probability 1/2 (seeded)."""
    rng = random.Random(f"privdpo-audit-inclusion-{seed}")
    return [rng.random() < 0.5 for _ in range(m)]


class GradientCanaries:
    """White-box canaries (Steinke et al. 2023, section 6): canary i is a unit whose clipped
    gradient is C times the unit vector of one coordinate of the trainable parameters (its
    own, distinct from the others'). An included canary joins DP-SGD like any unit:
    Poisson-sampled at the run's rate q each step, its gradient added to the clipped sum
    before the noise. Its score is the sum over steps of the privatized sum (clipped sum +
    noise) at its coordinate: the mechanism's own output, of which the model is a function.
    """

    def __init__(self, params: list, included: list[bool], seed: int):
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        if len(included) > total:
            raise ValueError(
                f"{len(included)} gradient canaries need as many coordinates; the model has {total}"
            )
        rng = random.Random(f"privdpo-audit-coordinates-{seed}")
        flat = rng.sample(range(total), len(included))
        self.coordinates = []  # (parameter index, flat index within it)
        for f in flat:
            i = 0
            while f >= sizes[i]:
                f -= sizes[i]
                i += 1
            self.coordinates.append((i, f))
        self.param_ids = [id(p) for p in params]
        self.included = included
        self.seed = seed
        self.scores = [0.0] * len(included)
        self._by_param: dict[int, list[tuple[int, int]]] = {}
        for c, (i, f) in enumerate(self.coordinates):
            self._by_param.setdefault(self.param_ids[i], []).append((c, f))

    def add(self, sums: dict, params: list, step: int, plan) -> None:
        """Add C e_j to the clipped sum for each included canary sampled at this step."""
        rng = random.Random(f"privdpo-audit-sampling-{self.seed}-{step}")
        for c, (i, f) in enumerate(self.coordinates):
            sampled = rng.random() < plan.sampling_rate  # drawn for every canary: one stream
            if self.included[c] and sampled:
                sums[self.param_ids[i]].view(-1)[f] += plan.max_grad_norm

    def observe(self, param, privatized) -> None:
        """Read the privatized sum of `param` (clipped sum + noise) at the canaries' coordinates."""
        mine = self._by_param.get(id(param))
        if not mine:
            return
        flat = privatized.view(-1)
        index = [f for _, f in mine]
        values = flat[index].tolist() if len(index) else []
        for (c, _), v in zip(mine, values, strict=True):
            self.scores[c] += v
