"""The user-level accountant of ELS: DP-SGD steps as mixtures of Gaussians.

Charles, Ganesh, McKenna, McMahan, Mitchell, Pillutla, Rush 2024, "Fine-Tuning Large
Language Models with User-Level Differential Privacy" (arXiv:2407.07737), compare two
ways to protect everything one user contributed. Both first cap each user at k units
(a unit is an SFT example or a DPO pair; `cap_contributions`):

- ELS, example-level sampling: DP-SGD over the kept units as if they were independent
  (Poisson sampling of units at rate q, per-unit clipping to C, noise N(0, sigma^2 C^2)
  on the sum), with user-level accounting. In one step the number J of a given user's
  units in the batch is Binomial(k, q); their clipped gradients add up to norm <= J C.
  One step is therefore the mixture-of-Gaussians (MoG) mechanism: on one neighbour the
  output is N(0, sigma^2), on the other sum_j P(J = j) N(j, sigma^2) (in units of C), a
  `dp_accounting.dp_event.MixtureOfGaussiansDpEvent` (Choquette-Choo, Ganesh, Steinke,
  Thakurta 2023, "Privacy Amplification for Matrix Mechanisms", Cor. 4.7, reduce the
  vector case to this scalar one). The run is that step composed `steps` times,
  measured with the PLD accountant (`els_epsilon`).
The MoG privacy-loss distribution is built by dp-accounting's own
`MixtureGaussianPrivacyLoss`, except that its inverse privacy loss (a binary search done
one tree node per Python call, the library's stated bottleneck) is run for all grid
points at once with numpy (`_VectorizedMixtureGaussianPrivacyLoss`). The result equals
the library's `PLDAccountant` on the same `MixtureOfGaussiansDpEvent` to about 1e-10
(tested) and 4x (k = 512) to 20x (k = 4) faster. Results are cached in memory;
`els_epsilon` and `calibrate_els_noise` also as JSON on disk under $PRIVDPO_CACHE_DIR
(default ~/.cache/privdpo; the empty string turns the disk cache off).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld.privacy_loss_mechanism import AdjacencyType, MixtureGaussianPrivacyLoss
from scipy import special, stats

from privdpo.privacy import accounting
from privdpo.privacy.accounting import (
    PLD_VALUE_DISCRETIZATION,
    _check_delta,
    _check_noise_multiplier,
    _check_positive_steps,
    _check_sampling_rate,
    _check_steps,
    _check_target_epsilon,
)
from privdpo.privacy.contributions import _check_bound

# `calibrate_els_noise` aims at this fraction of the target, and accepts anything in
# [CALIBRATION_FLOOR * target, target]: the 1% window of `accounting.calibrate_noise`.
_CALIBRATION_AIM = 0.995


CALIBRATION_FLOOR = 0.99


CACHE_DIR_ENV = "PRIVDPO_CACHE_DIR"


# Part of every disk-cache key: bump it when a cached computation changes.
_CACHE_SCHEMA = 1


def _check_els_accountant(accountant: str) -> None:
    if accountant != "pld":
        raise ValueError(
            f"accountant={accountant!r} is not available for ELS: its user-level step is a "
            "mixture of Gaussians, which only dp-accounting's PLD accountant measures. Use "
            "accountant='pld', or ULS (user-level sampling), which any accountant handles"
        )


def els_sensitivity_pmf(sampling_rate: float, k: int) -> list[float]:
    """P(J = j) for j = 0..k, J ~ Binomial(k, q): how many of a user's k units one step samples."""
    q = _check_sampling_rate(sampling_rate)
    k = _check_bound(k)
    return [float(p) for p in stats.binom.pmf(np.arange(k + 1), k, q)]


def els_step_event(
    sampling_rate: float, noise_multiplier: float, k: int
) -> dp_accounting.dp_event.MixtureOfGaussiansDpEvent:
    """One ELS step for one user with k units: a mixture of Gaussians (see the module doc).

    dp-accounting reads `standard_deviation` and `sensitivities` in the same (absolute)
    units, and the privacy loss only depends on their ratio: with the clipping norm C as
    the unit, the noise std is sigma (the noise multiplier) and j sampled clipped units
    add at most j to the sum's norm, so sensitivities = [0, 1, ..., k] with
    sampling_probs = Binomial(k, q) pmf. The PLD accountant accepts this event only under
    add/remove neighbours (ours) and builds both the REMOVE and the ADD side.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    return dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
        standard_deviation=sigma,
        sensitivities=[float(j) for j in range(_check_bound(k) + 1)],
        sampling_probs=els_sensitivity_pmf(sampling_rate, k),
    )


class _VectorizedMixtureGaussianPrivacyLoss(MixtureGaussianPrivacyLoss):
    """dp-accounting's MoG privacy loss with its inverse-privacy-loss search vectorized.

    The library bisects all grid losses at once by recursing over the search interval,
    one Python call per tree node (~10 per grid point). Here every grid loss keeps its own
    interval and all intervals are halved together, evaluating the privacy loss once per
    distinct midpoint; each loss follows the same path as in the recursion, so the result
    is the same up to floating-point rounding of the log-sum-exp.
    """

    def _privacy_losses_at(self, x: np.ndarray) -> np.ndarray:
        """`privacy_loss` at each point of x (a log-sum-exp over the sensitivities)."""
        sign = 1.0 if self.adjacency_type == AdjacencyType.ADD else -1.0
        constants = self._precompute_privacy_loss_constants
        slopes = sign * self.sensitivities / self._variance
        out = np.empty_like(x)
        rows = max(1, 2_000_000 // len(slopes))  # bounds the temporary's size
        for start in range(0, len(x), rows):
            summands = constants + np.multiply.outer(x[start : start + rows], slopes)
            top = summands.max(axis=1, keepdims=True)
            summands -= top
            np.exp(summands, out=summands)
            out[start : start + rows] = np.log(summands.sum(axis=1)) + top[:, 0]
        return -out if sign > 0 else out

    def _inverse_privacy_losses_with_range(
        self, privacy_losses: np.ndarray, bounds: tuple[float, float], precision: float = 1e-6
    ) -> np.ndarray:
        """For each loss l, the smallest multiple of precision x with privacy_loss(x) <= l."""
        losses = np.asarray(privacy_losses, dtype=float)
        lower = np.full(losses.shape, float(bounds[0]))
        upper = np.full(losses.shape, float(bounds[1]))
        while True:
            active = np.flatnonzero(upper - lower > precision)
            if active.size == 0:
                break
            middle = (lower[active] + upper[active]) / 2
            # Sorted losses have non-increasing midpoints: evaluate each distinct one once.
            if np.all(middle[1:] <= middle[:-1]):
                starts = np.flatnonzero(np.r_[True, middle[1:] != middle[:-1]])
                which = np.cumsum(np.r_[False, middle[1:] != middle[:-1]])
                points = middle[starts]
            else:
                points, which = np.unique(middle, return_inverse=True)
            loss_at_middle = self._privacy_losses_at(points)[which]
            below = losses[active] < loss_at_middle  # the loss is reached right of middle
            lower[active[below]] = middle[below]
            upper[active[~below]] = middle[~below]
        return np.floor(upper / precision) * precision


def _mog_pld(
    sigma: float, sensitivities: list[float], probs: list[float]
) -> pld_lib.PrivacyLossDistribution:
    """PLD of one MoG step, as `pld_lib.from_mixture_gaussian_mechanism` builds it.

    Connect-the-dots (Doroshenko et al. 2022) on the grid PLD_VALUE_DISCRETIZATION,
    pessimistic, library default truncation (log mass -50); REMOVE and ADD sides.
    """
    grid = PLD_VALUE_DISCRETIZATION

    def side(adjacency: AdjacencyType) -> pld_pmf.PLDPmf:
        loss = _VectorizedMixtureGaussianPrivacyLoss(
            sigma, sensitivities, probs, adjacency_type=adjacency
        )
        bounds = loss.connect_dots_bounds()
        upper = math.ceil(bounds.epsilon_upper / grid)
        lower = math.floor(bounds.epsilon_lower / grid)
        deltas = loss.get_delta_for_epsilon(np.arange(lower, upper + 1) * grid)
        return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(grid, lower, upper, deltas)

    return pld_lib.PrivacyLossDistribution(side(AdjacencyType.REMOVE), side(AdjacencyType.ADD))


@functools.lru_cache(maxsize=16)
def _els_step_pld(q: float, sigma: float, k: int) -> pld_lib.PrivacyLossDistribution:
    """PLD of one ELS step (sigma > 0, k >= 1). Cached: composing it over n steps is cheap."""
    event = els_step_event(q, sigma, k)
    return _mog_pld(sigma, list(event.sensitivities), list(event.sampling_probs))


def _cache_dir() -> Path | None:
    value = os.environ.get(CACHE_DIR_ENV)
    if value == "":
        return None
    return Path(value) if value else Path.home() / ".cache" / "privdpo"


def _cache_path(kind: str, key: dict) -> tuple[Path, dict] | None:
    directory = _cache_dir()
    if directory is None:
        return None
    full_key = {
        "kind": kind,
        "schema": _CACHE_SCHEMA,
        "dp_accounting": metadata.version("dp-accounting"),
        "grid": PLD_VALUE_DISCRETIZATION,
        **key,
    }
    name = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()
    return directory / "user_level" / f"{name}.json", full_key


def _disk_lookup(kind: str, key: dict) -> float | None:
    located = _cache_path(kind, key)
    if located is None:
        return None
    path, full_key = located
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != full_key:
        return None
    value = record.get("value")
    return float(value) if isinstance(value, (int, float)) else None


def _disk_store(kind: str, key: dict, value: float) -> None:
    located = _cache_path(kind, key)
    if located is None or not math.isfinite(value):
        return
    path, full_key = located
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": full_key, "value": value}), encoding="utf-8")
        os.replace(partial, path)  # atomic: a concurrent reader sees all or nothing
    except OSError as error:
        warnings.warn(
            f"could not write the privacy cache under {path.parent} ({error}); results are "
            f"still correct, only not cached. Set {CACHE_DIR_ENV} to a writable directory, "
            "or to the empty string to turn the disk cache off",
            stacklevel=3,
        )


@functools.lru_cache(maxsize=4096)
def _els_composed_epsilon(
    segments: tuple[tuple[float, float, int], ...], k: int, delta: float
) -> float:
    """User-level epsilon of ELS segments (q, sigma, steps) run in order (inputs checked)."""
    segments = tuple(s for s in segments if s[2] > 0)
    if not segments:
        return 0.0
    if any(sigma == 0 for _, sigma, _ in segments):
        return math.inf
    if k == 1:  # Binomial(1, q) mixture = the Poisson-subsampled Gaussian, exactly
        return accounting._composed_epsilon(segments, delta, "pld")
    pld = None
    for q, sigma, steps in segments:
        part = _els_step_pld(q, sigma, k).self_compose(steps)
        pld = part if pld is None else pld.compose(part)
    return float(pld.get_epsilon_for_delta(delta))


def els_composed_epsilon(
    segments: Sequence[Sequence[float]], k: int, delta: float, accountant: str = "pld"
) -> float:
    """User-level ELS epsilon of [sampling_rate, noise_multiplier, steps] segments run in order.

    What `PrivacyLedger` with `els_bound=k` reports: the ComposedDpEvent of each
    segment's `els_step_event` self-composed, through the PLD accountant. Cached in
    memory only (a ledger asks at every logged step).
    """
    _check_els_accountant(accountant)
    k = _check_bound(k)
    delta = _check_delta(delta)
    checked = tuple(
        (_check_sampling_rate(q), _check_noise_multiplier(sigma), _check_steps(steps))
        for q, sigma, steps in segments
    )
    return _els_composed_epsilon(checked, k, delta)


def els_epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    k: int,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """User-level epsilon of `steps` ELS steps (the MoG accountant of Charles et al. 2024).

    Each step is `els_step_event(q, sigma, k)`: noise N(0, sigma^2) against the mixture
    sum_j Binomial(k, q)(j) N(j, sigma^2), j = 0..k, in units of the clipping norm. The
    steps are composed with the PLD accountant (grid `PLD_VALUE_DISCRETIZATION`,
    pessimistic connect-the-dots), so this is an upper bound on epsilon at `delta` for
    add/remove of one user holding at most k units. For k = 1 the step is the
    Poisson-subsampled Gaussian and this equals `accounting.epsilon`. Returns inf when
    noise_multiplier == 0 and 0.0 when steps == 0. Cached in memory and on disk.
    """
    _check_els_accountant(accountant)
    q = _check_sampling_rate(sampling_rate)
    sigma = _check_noise_multiplier(noise_multiplier)
    k = _check_bound(k)
    steps = _check_steps(steps)
    delta = _check_delta(delta)
    key = {"q": q, "sigma": sigma, "k": k, "steps": steps, "delta": delta}
    cached = _disk_lookup("els_epsilon", key)
    if cached is not None:
        return cached
    value = _els_composed_epsilon(((q, sigma, steps),), k, delta)
    _disk_store("els_epsilon", key, value)
    return value


def _log_geometric_sum(k: int, eps: np.ndarray) -> np.ndarray:
    """log(sum_{i=0}^{k-1} e^{i eps}) = log((e^{k eps} - 1) / (e^{eps} - 1)), = log k at eps 0."""
    eps = np.asarray(eps, dtype=float)
    out = np.full(eps.shape, math.log(k))
    positive = eps > 0
    e = eps[positive]
    out[positive] = k * e + np.log(-np.expm1(-k * e)) - np.log(np.expm1(e))
    return out


def els_group_epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    k: int,
    steps: int,
    delta: float,
) -> float:
    """A loose user-level epsilon for ELS from unit-level DP and group privacy (for comparison).

    Unit level, the run is DP-SGD: every point (eps1, delta1(eps1)) of its privacy
    profile (PLD accountant) is a valid (eps1, delta1)-DP guarantee for add/remove of one
    unit. A user is a group of at most k units. Group privacy for (eps, delta)-DP (e.g.
    Vadhan 2017, "The Complexity of Differential Privacy"): datasets D_0 and D_k
    that differ in k units are joined by a chain D_0, ..., D_k of neighbours, and applying
    P[M(D_i) in S] <= e^eps1 P[M(D_{i+1}) in S] + delta1 along it gives
    (k eps1, delta1 (1 + e^eps1 + ... + e^{(k-1) eps1}))-DP; that delta is at most the
    k e^{(k-1) eps1} delta1 often quoted. This returns k * eps1 for the smallest eps1 on a
    grid of step 1e-4 (rounded up, so still a valid bound) with
    delta1(eps1) * sum_{i<k} e^{i eps1} <= delta, i.e. the unit-level delta1 is solved
    for so that the group delta is the reported delta; inf if no eps1 <= 1000 does.
    """
    q = _check_sampling_rate(sampling_rate)
    sigma = _check_noise_multiplier(noise_multiplier)
    k = _check_bound(k)
    steps = _check_steps(steps)
    delta = _check_delta(delta)
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    pld = pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma,
        sampling_prob=q,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    ).self_compose(steps)

    def feasible(eps1: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            log_delta1 = np.log(np.asarray(pld.get_delta_for_epsilon(eps1), dtype=float))
        return log_delta1 + _log_geometric_sum(k, eps1) <= math.log(delta)

    # Coarse scan for the first feasible eps1, then refine between it and the one before.
    top = 16.0
    while True:
        coarse = np.arange(0, round(top * 100) + 1) / 100
        ok = np.flatnonzero(feasible(coarse))
        if ok.size:
            break
        if top >= 1000:
            return math.inf
        top *= 2
    first = int(ok[0])
    if first == 0:
        return 0.0
    fine = coarse[first - 1] + np.arange(1, 101) / 1e4
    fine[-1] = coarse[first]  # feasible by the coarse scan
    return float(k * fine[np.flatnonzero(feasible(fine))[0]])


def _gdp_guess(q: float, k: int, steps: int, delta: float, target: float) -> tuple[float, float]:
    """A starting sigma for the ELS search, and d log(eps) / d log(sigma) there, from the
    CLT approximation of the composition.

    T self-composed steps of P vs Q are close to mu-GDP with mu^2 ~ T chi^2(P || Q); for
    the subsampled Gaussian, chi^2 = q^2 (e^{1/sigma^2} - 1), this is the CLT of Bu, Dong,
    Long, Su 2020 ("Deep Learning with Gaussian Differential Privacy"). For the MoG step
    1 + chi^2 = sum_{i,j} p_i p_j e^{i j / sigma^2}. A heuristic, poor at small sigma: it
    only gives the search its first point; every answer is checked with the PLD accountant.
    """
    pmf = np.asarray(els_sensitivity_pmf(q, k))
    support = np.flatnonzero(pmf > 1e-30)  # enough for a starting point
    log_p = np.log(pmf[support])
    pairs = np.multiply.outer(support, support).astype(float)
    log_pp = log_p[:, None] + log_p[None, :]

    def eps_of(sigma: float) -> float:
        log_one_plus_chi2 = special.logsumexp(log_pp + pairs / sigma**2)
        mu = math.sqrt(steps * max(math.expm1(min(log_one_plus_chi2, 700.0)), 1e-300))

        def delta_of(eps: float) -> float:  # the mu-GDP privacy profile
            return float(
                special.ndtr(-eps / mu + mu / 2)
                - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2))
            )

        lo, hi = 0.0, 1.0
        while delta_of(hi) > delta and hi < 1e3:
            lo, hi = hi, 2 * hi
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
        return hi

    lo, hi = math.log(2**-10), math.log(2**20)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps_of(math.exp(mid)) > target else (lo, mid)
    sigma = math.exp(hi)
    near = eps_of(1.05 * sigma)
    slope = (math.log(near) - math.log(eps_of(sigma))) / math.log(1.05) if near > 0 else -1.0
    return sigma, min(max(slope, -4.0), -1.0)  # the CLT slope is poor at small sigma


@functools.lru_cache(maxsize=256)
def _calibrate_els_noise(target: float, delta: float, q: float, k: int, steps: int) -> float:
    """`calibrate_els_noise` on checked arguments."""
    if k == 1:
        return accounting.calibrate_noise(target, delta, q, steps)
    key = {"target_epsilon": target, "delta": delta, "q": q, "k": k, "steps": steps}
    cached = _disk_lookup("els_sigma", key)
    if cached is not None:
        return cached

    def log_eps(log_sigma: float) -> float:
        eps = _els_composed_epsilon(((q, math.exp(log_sigma), steps),), k, delta)
        return math.log(eps) if eps > 0 else -math.inf

    # Secant steps on log(eps) against log(sigma) (eps is close to a power of sigma),
    # kept inside the bracket (too_little, enough) and bisecting when they leave it.
    aim = math.log(_CALIBRATION_AIM * target)
    floor, ceiling = math.log(CALIBRATION_FLOOR * target), math.log(target)
    smallest, largest = math.log(2**-10), math.log(2**20)
    too_little, enough = -math.inf, math.inf  # log sigma with eps > target / eps <= target
    previous: tuple[float, float] | None = None
    guess, slope = _gdp_guess(q, k, steps, delta, target)
    x = min(max(math.log(guess), smallest), largest)
    for _ in range(60):
        y = log_eps(x)
        if y > ceiling:
            too_little = max(too_little, x)
            if x >= largest:
                raise ValueError(
                    f"no noise_multiplier up to 2**20 reaches target_epsilon={target} "
                    f"with delta={delta}, sampling_rate={q}, k={k}, steps={steps}"
                )
        else:
            enough = min(enough, x)
            if y >= floor:
                break
            if x <= smallest:
                raise ValueError(
                    f"target_epsilon={target} is met even with noise_multiplier < 2**-10 "
                    f"(delta={delta}, sampling_rate={q}, k={k}, steps={steps}); "
                    "is it meant to be so large?"
                )
        if previous is not None and math.isfinite(y) and previous[1] != y:
            x_next = x + (aim - y) * (x - previous[0]) / (y - previous[1])
        else:
            x_next = x + (aim - y) / slope if math.isfinite(y) else x - math.log(2)
        previous = (x, y)
        if not too_little < x_next < enough:
            if math.isinf(too_little):
                x_next = enough - math.log(2)
            elif math.isinf(enough):
                x_next = too_little + math.log(2)
            else:
                x_next = (too_little + enough) / 2
        x = min(max(x_next, smallest), largest)
    if math.isinf(enough):
        raise RuntimeError(f"ELS noise calibration found no sigma meeting the target for {key}")
    # The smallest sigma seen that meets the target (within 1% when the loop converged).
    sigma = math.exp(enough)
    _disk_store("els_sigma", key, sigma)
    return sigma


def calibrate_els_noise(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    k: int,
    steps: int,
    accountant: str = "pld",
) -> float:
    """The smallest noise multiplier whose `els_epsilon` over `steps` steps is <= target.

    A secant search on log(epsilon) against log(sigma), started at a Gaussian-DP (CLT)
    estimate, bracketed and bisected when the secant overshoots; it stops at the first
    sigma with CALIBRATION_FLOOR * target <= els_epsilon <= target (within 1% below the
    target, like `accounting.calibrate_noise`). Each try costs one MoG PLD (0.1-2 s for
    the k and sigma of practice); a search takes about 3-6. For k = 1 it is
    `accounting.calibrate_noise`. Cached in memory and on disk.
    """
    _check_els_accountant(accountant)
    target_epsilon = _check_target_epsilon(target_epsilon)
    delta = _check_delta(delta)
    q = _check_sampling_rate(sampling_rate)
    k = _check_bound(k)
    steps = _check_positive_steps(steps)
    return _calibrate_els_noise(target_epsilon, delta, q, k, steps)


def els_max_steps_within(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    noise_multiplier: float,
    k: int,
    accountant: str = "pld",
) -> int:
    """The largest number of ELS steps whose user-level `els_epsilon` is <= target_epsilon.

    Exponential then binary search over steps; the one-step MoG PLD is built once and
    composed for each try. 0 when even one step exceeds the budget; at most
    `accounting.MAX_STEPS`.
    """
    _check_els_accountant(accountant)
    target_epsilon = _check_target_epsilon(target_epsilon)
    delta = _check_delta(delta)
    q = _check_sampling_rate(sampling_rate)
    sigma = _check_noise_multiplier(noise_multiplier)
    k = _check_bound(k)
    return accounting._largest_steps_within(
        lambda n: _els_composed_epsilon(((q, sigma, n),), k, delta), target_epsilon
    )
