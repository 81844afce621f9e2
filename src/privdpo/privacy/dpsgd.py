"""DP-SGD as named steps: sample, clip (per unit), accumulate, add noise, scale.

Abadi et al. 2016, with Poisson sampling of units at rate q (each unit independently in
each logical batch), per-unit clipping to norm C, one Gaussian draw N(0, sigma^2 C^2) per
parameter coordinate per logical step, and division by the *expected* batch size q*N (a
constant, so the sensitivity stays C / (q N)). A logical batch is processed in physical
micro-batches: clipping is per unit and the clipped sums add up, so micro-batching does
not change the result. The guarantee is for add/remove of one unit.

A unit is a group of training items (examples or pairs). At example/pair level each item
is its own unit. At user level (Charles et al. 2024, "Fine-Tuning Large Language Models
with User-Level Differential Privacy") each user first keeps at most k items, then:
- ELS (example-level sampling): items are still sampled and clipped one by one; the
  user-level epsilon accounts for a user's k items (mixture-of-Gaussians PLD);
- ULS (user-level sampling): a unit is all of a user's kept items; users are sampled,
  and a user's gradient is the average of its items' gradients, clipped once.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from privdpo.config import PrivacyConfig
from privdpo.distributed import SINGLE, all_reduce_sum, broadcast_int
from privdpo.privacy.accounting import max_steps_within
from privdpo.privacy.clipping import PerUnitGradients
from privdpo.privacy.els_accounting import els_max_steps_within
from privdpo.privacy.ledger import PrivacyLedger
from privdpo.privacy.planning import PrivacyPlan, UserBound, micro_batch_note, plan_from_config
from privdpo.privacy.statement import statement

# Noise values drawn at once (float32): 256 MiB, however big the model.
NOISE_CHUNK = 2**26


class DPSGD:
    """The private part of a training step; the recipe keeps its loop."""

    def __init__(
        self, model, plan: PrivacyPlan, cfg: PrivacyConfig, seed: int, groups, world=SINGLE
    ):
        self.plan = plan
        self.world = world  # several ranks: clipped sums are summed over them
        self.groups: list[list[int]] = groups  # unit -> its item indices
        self.secure = cfg.secure_noise
        self.seed = seed
        self.clipper = PerUnitGradients(model, ghost=cfg.ghost_clipping)
        self._epsilon_ahead: EpsilonAhead | None = None
        self.canaries = None  # white-box audit canaries (privacy/audit.py), else None
        self.ledger = PrivacyLedger(
            unit=plan.unit, delta=plan.delta, accountant=plan.accountant, els_bound=plan.els_bound
        )
        # A run with a target stops before the step that would take it past the target.
        self.budget_steps = None
        if plan.target_epsilon is not None and plan.els_bound is not None:
            self.budget_steps = els_max_steps_within(
                plan.target_epsilon,
                plan.delta,
                plan.sampling_rate,
                plan.noise_multiplier,
                plan.els_bound,
            )
        elif plan.target_epsilon is not None:
            self.budget_steps = max_steps_within(
                plan.target_epsilon,
                plan.delta,
                plan.sampling_rate,
                plan.noise_multiplier,
                plan.accountant,
            )

    @classmethod
    def from_config(
        cls, cfg, model, groups: list[list[int]], steps: int, users: UserBound | None, world=SINGLE
    ) -> DPSGD | None:
        """The private step of a run's config (printing its plan), or None for a run
        without privacy; `groups` and `users` as `privacy_units` returned them."""
        if not cfg.privacy.enabled:
            return None
        plan = plan_from_config(cfg, groups, steps, users)
        print("differential privacy plan:\n" + plan.table())
        if cfg.train.micro_batch_tokens is None and all(len(g) == 1 for g in groups):
            note = micro_batch_note(
                plan.num_units // world.size,
                plan.sampling_rate,
                cfg.train.micro_batch_size,
                "pairs" if hasattr(cfg, "dpo") else "examples",
            )
            if note:
                print(note)
        return cls(model, plan, cfg.privacy, cfg.train.seed, groups, world)

    # ---- sample -----------------------------------------------------------------------
    def sample(self, step: int) -> list[int]:
        """Poisson sampling: each unit joins the logical batch of `step` with probability q,
        independently (seeded by run seed and step, so a resumed run draws the same)."""
        gen = torch.Generator().manual_seed(hash_seed(self.seed, step, "sample"))
        keep = torch.rand(self.plan.num_units, generator=gen) < self.plan.sampling_rate
        return keep.nonzero().flatten().tolist()

    def micro_batches(
        self, units: list[int], size: int, max_tokens: int | None = None, tokens_of=None
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Pack the sampled units into micro-batches of at most `size` items (and at most
        `max_tokens` tokens, counted by `tokens_of(item index)`); yield (item indices, each
        item's unit within the micro-batch, each item's loss weight).

        A unit is never split, since its clipping needs all its items: a unit over either
        cap gets a micro-batch of its own. The weight is 1 / (items in the unit), so the
        gradient of the weighted loss sum is each unit's average item gradient (ULS); a
        one-item unit has weight 1."""
        items: list[int] = []
        unit_of: list[int] = []
        weights: list[float] = []
        tokens = 0
        for u in units:
            group = self.groups[u]
            group_tokens = sum(tokens_of(i) for i in group) if max_tokens else 0
            full = len(items) + len(group) > size or (
                max_tokens is not None and tokens + group_tokens > max_tokens
            )
            if items and full:
                yield items, torch.tensor(unit_of), torch.tensor(weights)
                items, unit_of, weights, tokens = [], [], [], 0
            n = (unit_of[-1] + 1) if unit_of else 0
            items += group
            unit_of += [n] * len(group)
            weights += [1.0 / len(group)] * len(group)
            tokens += group_tokens
        if items:
            yield items, torch.tensor(unit_of), torch.tensor(weights)

    # ---- clip and accumulate ------------------------------------------------------------
    @contextmanager
    def micro_batch(self, batch):
        """Run the micro-batch's forward and `backward()` on the (weighted) SUM of its item
        losses inside; on leaving, each unit's gradient is clipped and added to the step's
        sum. `batch`: the host `TokenBatch`, built with the micro-batch's item_unit."""
        with self.clipper.units(batch):
            yield
        self.clipper.clip_and_accumulate(self.plan.max_grad_norm)

    @property
    def head_sink(self):
        """Pass to `sequence_logps(..., sink=)` inside `micro_batch`."""
        return self.clipper.head_sink

    # ---- noise and scale ----------------------------------------------------------------
    @torch.no_grad()
    def noise_std(self) -> float:
        """The std of the Gaussian noise on each coordinate of the clipped sum: sigma * C,
        what the accountant assumes."""
        return self.plan.noise_multiplier * self.plan.max_grad_norm

    def noise_and_scale(self, step: int) -> None:
        """Set each `param.grad` to (clipped sum + N(0, sigma^2 C^2)) / (q N). Gradient
        canaries of an audit (`privdpo audit`, white box) join the clipped sum as units and
        read the privatized sum back."""
        sums = self.clipper.take_clipped_sum()
        # Each rank clipped its own units; the noise goes once on the sum over ranks.
        all_reduce_sum(self.world, [sums[id(p)] for p in self.clipper.params])
        if self.canaries is not None:
            self.canaries.add(sums, self.clipper.params, step, self.plan)
        std = self.noise_std()
        expected_batch = self.plan.sampling_rate * self.plan.num_units
        seed = secrets.randbits(63) if self.secure else hash_seed(self.seed, step, "noise")
        seed = broadcast_int(self.world, seed)  # one seed for the world: rank 0's
        params = self.clipper.params
        totals = [sums[id(p)] for p in params]  # float32, on the parameters' device
        if std > 0:  # one generator per step, drawn from in parameter order
            gen = torch.Generator(device=totals[0].device).manual_seed(seed)
            for chunk in _chunks(totals, NOISE_CHUNK):  # one draw, one add per chunk
                numels = [t.numel() for t in chunk]
                noise = torch.randn(
                    sum(numels), generator=gen, device=chunk[0].device, dtype=torch.float32
                )
                parts = [n.view_as(t) for n, t in zip(noise.split(numels), chunk, strict=True)]
                torch._foreach_add_(chunk, parts, alpha=std)
        if self.canaries is not None:
            for p, total in zip(params, totals, strict=True):
                self.canaries.observe(p, total)
        torch._foreach_div_(totals, expected_batch)
        cast = []
        for p, total in zip(params, totals, strict=True):
            if p.dtype == total.dtype:
                p.grad = total
            else:
                cast.append((p, total))
        if cast:  # into gradients of the parameters' dtype, one multi-tensor copy
            grads = [torch.empty_like(p) for p, _ in cast]
            torch._foreach_copy_(grads, [t for _, t in cast])
            for (p, _), grad in zip(cast, grads, strict=True):
                p.grad = grad
        self.ledger.record_step(self.plan.sampling_rate, self.plan.noise_multiplier)

    # ---- epsilon, off the training thread ----------------------------------------------
    def plan_logged_epsilons(self, steps: list[int]) -> None:
        """Start computing, in a background thread, the epsilon after each of `steps` (the
        steps that will be logged): the noise and sampling rate are fixed, so each is known
        before the step runs, and the accountant stays off the training step."""
        q, sigma = self.plan.sampling_rate, self.plan.noise_multiplier
        last = self.budget_steps if self.budget_steps is not None else max(steps, default=0)
        keys = {
            s: self.ledger.key_after(s - self.ledger.steps, q, sigma)
            for s in {min(s, last) for s in steps}
            if s > self.ledger.steps
        }
        self.stop_epsilons()
        self._epsilon_ahead = EpsilonAhead(keys, self.ledger.epsilon_of_key)

    def stop_epsilons(self) -> None:
        """Stop the background epsilons (the run ended, perhaps early): the thread would
        otherwise go on computing epsilons of steps that never ran."""
        if self._epsilon_ahead is not None:
            self._epsilon_ahead.stop()

    def logged_epsilon(self) -> float:
        """The ledger's epsilon now: from the background thread when it is ready."""
        if self._epsilon_ahead is not None:
            return self._epsilon_ahead.get(self.ledger.steps, self.ledger.key())
        return self.ledger.epsilon()

    def out_of_budget(self) -> bool:
        return self.budget_steps is not None and self.ledger.steps >= self.budget_steps

    def budget_message(self) -> str:
        return (
            f"privacy budget: stopping after {self.ledger.steps} steps; one more step would"
            f" take epsilon past privacy.target_epsilon={self.plan.target_epsilon}"
            f" (delta={self.plan.delta:.3g})"
        )

    # ---- statement ----------------------------------------------------------------------
    def statement(self, coverage=None) -> dict:
        """privacy.json: this run's mechanism and, with the run's `Coverage` in its lineage,
        the end-to-end bound (`statement.statement`)."""
        return statement(self.plan, self.ledger, self.secure, coverage)


class EpsilonAhead:
    """Epsilons of ledger keys (step -> segments), computed in step order by a daemon
    thread. `get` returns the thread's value when the key matches, waits for it when the
    thread is computing that very key, and otherwise computes it on the calling thread
    (the thread then skips it): the number is the same either way (an exact function of
    the key). `stop` ends the thread after the key it is on."""

    def __init__(self, keys: dict[int, tuple], epsilon_of):
        self.keys = keys
        self.epsilon_of = epsilon_of
        self.values: dict[int, float | None] = {}  # None: claimed by `get`, being computed
        self.current: int | None = None  # the step the thread is computing
        self.stopped = False
        self.changed = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="privdpo-epsilon").start()

    def _run(self) -> None:
        for step, key in sorted(self.keys.items()):
            with self.changed:
                if self.stopped:
                    break
                if step in self.values:
                    continue
                self.current = step
            value = self.epsilon_of(key)
            with self.changed:
                self.values.setdefault(step, value)
                self.current = None
                self.changed.notify_all()

    def get(self, step: int, key: tuple) -> float:
        if self.keys.get(step) != key:
            return self.epsilon_of(key)
        with self.changed:
            while step not in self.values and self.current == step:
                self.changed.wait()
            if step in self.values:
                return self.values[step]
            self.values[step] = None  # claimed: the thread skips it
        value = self.epsilon_of(key)
        with self.changed:
            self.values[step] = value
        return value

    def stop(self) -> None:
        with self.changed:
            self.stopped = True


def _chunks(tensors: list[torch.Tensor], values: int) -> Iterator[list[torch.Tensor]]:
    """`tensors` in consecutive runs of at most `values` elements (a bigger one alone)."""
    run, size = [], 0
    for t in tensors:
        if run and size + t.numel() > values:
            yield run
            run, size = [], 0
        run.append(t)
        size += t.numel()
    if run:
        yield run


def hash_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed from (run seed, step, purpose), stable across Python runs."""
    import hashlib

    digest = hashlib.sha256(f"privdpo-{purpose}-{seed}-{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
