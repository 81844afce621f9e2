"""Per-unit clipped gradient sums against a naive loop that computes one unit at a time
(its own forward and backward, clip, add), for SFT examples and DPO pairs, LoRA and full
fine-tuning (tied embeddings included), packed (prompt shared or not) and padded batches,
ghost clipping on and off, with and without micro-batching."""

from __future__ import annotations

import copy

import pytest
import torch

from privdpo import logprobs
from privdpo.config import LoraConfig
from privdpo.data.batching import example_batch, pair_batch
from privdpo.data.preference import PairExample
from privdpo.data.sft import Example
from privdpo.data.tokenize import IGNORE
from privdpo.errors import UserError
from privdpo.logprobs import sequence_logps
from privdpo.losses import LossParams, PairLogps, sigmoid_loss
from privdpo.models import add_lora, build_preset, compile_layers
from privdpo.privacy.clipping import PerUnitGradients


@pytest.fixture(autouse=True)
def four_vocabulary_tiles(monkeypatch):
    """The tiny model's 512-token vocabulary in 4 tiles of 128: per-unit head gradients,
    Gram sums and the tied cross term are assembled across tiles."""
    monkeypatch.setattr(logprobs, "MIN_TILE", 128)
    monkeypatch.setattr(logprobs, "TILE_BYTES", 1)


LAYOUTS = {
    "packed-shared": ("packed", True),
    "packed": ("packed", False),
    "padded": ("padded", False),
}


def tiny(lora: bool):
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny")
    if lora:
        model = add_lora(
            model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
        )
        # Non-zero B so the adapters' gradients are not trivially structured.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    model.train()
    return model, tokenizer


def sft_examples(tokenizer, n: int) -> list[Example]:
    out = []
    for i in range(n):
        prompt = tokenizer(f"Review {i}: the movie").input_ids
        completion = tokenizer(" was" + " good" * (i % 4 + 1) + ".").input_ids
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
        out.append(Example(ids, labels, f"x:{i}", None))
    return out


def pairs(tokenizer, n: int) -> list[PairExample]:
    out = []
    for i in range(n):
        prompt = tokenizer(f"Pair {i}: it was").input_ids
        chosen = tokenizer(" great" + " fun" * (i % 3) + ".").input_ids
        rejected = tokenizer(" bad" * (i % 2 + 1) + "!").input_ids
        out.append(PairExample(prompt, chosen, rejected, f"x:{i}", None))
    return out


def sft_unit_losses(model, examples, batch=None, sink=None, compiled=False) -> torch.Tensor:
    """[U] each example's mean token NLL: the unit loss DP-SGD clips (`sink`: the clipper's
    head sink inside `units`; `compiled`: the head's tile work compiled)."""
    batch = batch or example_batch(examples, pad_id=1)
    logps, tokens = sequence_logps(model, batch, sink, compiled=compiled)
    return -logps / tokens


def dpo_unit_losses(model, reference, chunk, batch=None, sink=None, compiled=False):
    batch = batch or pair_batch(chunk, pad_id=1)
    logps, tokens = sequence_logps(model, batch, sink, compiled=compiled)
    with torch.no_grad():
        ref, _ = sequence_logps(reference, batch)
    c, r = logps.chunk(2)
    rc, rr = ref.chunk(2)
    tc, tr = tokens.chunk(2)
    return sigmoid_loss(PairLogps(c, r, tc, tr, rc, rr), LossParams(beta=0.5)).losses


def unit_batch(kind: str, chunk: list, layout: str, item_unit=None):
    """The batch of `chunk` with each item its own unit (or `item_unit`)."""
    item_unit = list(range(len(chunk))) if item_unit is None else item_unit
    name, share = LAYOUTS[layout]
    if kind == "sft":
        return example_batch(chunk, 1, name, item_unit=item_unit)
    return pair_batch(chunk, 1, name, share, item_unit=item_unit)


def naive_clipped_sum(model, unit_loss, units, max_norm) -> tuple[list[torch.Tensor], list]:
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for unit in units:
        model.zero_grad(set_to_none=True)
        unit_loss([unit]).sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, max_norm / (norm.item() + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    model.zero_grad(set_to_none=True)
    return total, norms


CASES = [
    # (kind, lora, micro, layout, ghost): every layout and ghost setting, each recipe.
    ("sft", False, 6, "packed", False),
    ("sft", False, 2, "packed", True),
    ("sft", True, 1, "padded", False),
    ("sft", False, 3, "padded", True),
    ("dpo", False, 6, "packed-shared", False),
    ("dpo", False, 2, "packed-shared", True),
    ("dpo", True, 6, "packed-shared", False),
    ("dpo", True, 1, "packed", False),
    ("dpo", False, 3, "packed", True),
    ("dpo", False, 2, "padded", False),
    ("dpo", False, 6, "padded", True),
]


@pytest.mark.parametrize(("kind", "lora", "micro", "layout", "ghost"), CASES)
def test_per_unit_clipping_equals_the_naive_loop(kind, lora, micro, layout, ghost, compiled=False):
    model, tokenizer = tiny(lora)
    if kind == "sft":
        units = sft_examples(tokenizer, 6)

        def unit_loss(chunk):
            return sft_unit_losses(model, chunk)
    else:
        units = pairs(tokenizer, 6)
        reference = copy.deepcopy(model).eval()

        def unit_loss(chunk):
            return dpo_unit_losses(model, reference, chunk)

    _, naive_norms = naive_clipped_sum(model, unit_loss, units, float("inf"))
    # A clipping norm between the smallest and largest unit norm: some units are clipped.
    max_norm = float(torch.stack(naive_norms).median())
    expected, _ = naive_clipped_sum(model, unit_loss, units, max_norm)

    sampler = PerUnitGradients(model, ghost=ghost)
    if compiled:
        compile_layers(model, fresh=True)
    norms = []
    for start in range(0, len(units), micro):
        chunk = units[start : start + micro]
        batch = unit_batch(kind, chunk, layout)
        with sampler.units(batch):
            sink = sampler.head_sink
            if kind == "sft":
                sft_unit_losses(model, chunk, batch, sink, compiled).sum().backward()
            else:
                dpo_unit_losses(model, reference, chunk, batch, sink, compiled).sum().backward()
        norms.append(sampler.clip_and_accumulate(max_norm))
    got = sampler.take_clipped_sum()
    sampler.detach()

    torch.testing.assert_close(torch.cat(norms), torch.stack(naive_norms), rtol=1e-5, atol=1e-7)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(float(n > max_norm) for n in naive_norms) >= 2  # clipping really happened
    for p, e in zip(params, expected, strict=True):
        # Relative to the size of the whole gradient, not element by element.
        assert (got[id(p)] - e).norm() <= 1e-5 * e.norm() + 1e-9
    if not lora:  # the tied embedding is one parameter used by two modules
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_compiled_layers_compute_every_per_unit_gradient_in_their_graphs():
    """train.compile with DP: each compiled decoder layer computes its per-unit gradients
    and their squared norms in its own backward graph (no graph break around the hooks),
    and the clipped sum is the naive loop's (the head's tile work compiled too). A full
    fine-tuning model compiled after a LoRA model in the same process (a sweep, a
    benchmark) gets its own graphs: dynamo does not check hooks before reusing a graph of
    the same layer class, and the LoRA model's graphs had none on o_proj and the MLP,
    whose weights then got no gradient at all."""
    from torch._dynamo.utils import counters

    counters.clear()
    # micro-batches of 4 and 2 units: the unit count is a dynamic dimension of each graph
    test_per_unit_clipping_equals_the_naive_loop("dpo", True, 4, "packed-shared", False, True)
    test_per_unit_clipping_equals_the_naive_loop("dpo", False, 4, "packed-shared", True, True)
    assert dict(counters["graph_break"]) == {}


def test_compiled_layers_compile_once_for_every_unit_count():
    """The unit count of a micro-batch (Poisson-sampled) is a dynamic dimension of the
    compiled layers' graphs, and identical layers share one: after the second micro-batch
    no unit count compiles a graph (each did while the probes' shapes were static, and
    after 8 recompilations dynamo would run every further layer eager)."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny(lora=False)
    reference = copy.deepcopy(model).eval()
    units = pairs(tokenizer, 20)
    sampler = PerUnitGradients(model)
    compile_layers(model, fresh=True)
    counters.clear()
    graphs = []
    for start, count in [(0, 4), (4, 2), (6, 3), (9, 5), (14, 6)]:
        chunk = units[start : start + count]
        batch = unit_batch("dpo", chunk, "packed-shared")
        with sampler.units(batch):
            dpo_unit_losses(model, reference, chunk, batch, sampler.head_sink).sum().backward()
        assert sampler.clip_and_accumulate(1.0).shape == (count,)
        graphs.append(counters["stats"]["unique_graphs"])
    sampler.detach()
    assert graphs[1] == graphs[-1], graphs
    assert graphs[-1] <= 3  # the first layer's, the others', and one recompilation


def test_per_unit_gradients_take_memory_only_from_the_backward_pass():
    """During the forward pass (when the activations are all alive) each layer's per-unit
    gradient is a zero probe of one element; the backward pass gives every parameter its
    [U, *shape] gradient, dropped after clipping. The probes are kept for the next
    micro-batch of as many units."""
    model, tokenizer = tiny(lora=False)
    examples = sft_examples(tokenizer, 3)
    sampler = PerUnitGradients(model)
    batch = unit_batch("sft", examples, "packed")
    with sampler.units(batch):
        losses = sft_unit_losses(model, examples, batch, sampler.head_sink)
        probes = [q for m, _ in sampler.layers for q in m.privdpo_probes if q is not None]
        assert len(probes) == len(sampler.params) - 1  # all but the tied embedding/head
        assert all(q.untyped_storage().nbytes() == q.element_size() for q in probes)
        assert sampler.per_unit() == {}
        losses.sum().backward()
        got = sampler.per_unit()
    assert {k: tuple(g.shape) for k, g in got.items()} == {
        id(p): (3, *p.shape) for p in sampler.params
    }
    first = sampler.clip_and_accumulate(1.0)
    # the per-unit gradients' memory goes with the micro-batch; the probes stay, made once
    # for each unit count, and a second micro-batch of 3 units gets the same probes back
    assert all(q.grad is None for q in probes)
    assert all(q.untyped_storage().nbytes() == q.element_size() for q in probes)
    assert all(float(q.reshape(-1)[0]) == 0.0 for q in probes)
    with sampler.units(batch):
        again = [q for m, _ in sampler.layers for q in m.privdpo_probes if q is not None]
        assert all(a is b for a, b in zip(again, probes, strict=True))
        sft_unit_losses(model, examples, batch, sampler.head_sink).sum().backward()
    assert torch.equal(sampler.clip_and_accumulate(1.0), first)  # no gradient left over
    sums = sampler.take_clipped_sum()
    sampler.detach()
    # the same micro-batch twice: twice its clipped sum, which the naive loop gives
    naive, _ = naive_clipped_sum(model, lambda c: sft_unit_losses(model, c), examples, 1.0)
    for p, e in zip(sampler.params, naive, strict=True):
        assert (sums[id(p)] - 2 * e).norm() <= 1e-5 * e.norm() + 1e-9


def test_an_unsupported_trainable_layer_is_refused():
    model, _ = tiny(lora=False)
    model.extra = torch.nn.Conv1d(2, 2, 1)  # a trainable layer clipping cannot see
    with pytest.raises(UserError, match="not supported"):
        PerUnitGradients(model)


@pytest.mark.parametrize("ghost", [False, True], ids=["per-unit", "ghost"])
def test_units_of_several_items_sum_their_items_before_clipping(ghost):
    """Units made of several examples (as users are): examples 0, 1, 2 form unit 0 and
    3, 4 unit 1, packed into one row. The per-unit gradients must equal those of the
    naive loop over the units."""
    model, tokenizer = tiny(lora=False)
    examples = sft_examples(tokenizer, 5)
    groups = [[0, 1, 2], [3, 4]]

    def unit_loss(group_list):
        return torch.stack(
            [sft_unit_losses(model, [examples[i] for i in g]).sum() for g in group_list]
        )

    expected, naive_norms = naive_clipped_sum(model, unit_loss, groups, 0.5)
    sampler = PerUnitGradients(model, ghost=ghost)
    batch = example_batch(examples, 1, item_unit=[0, 0, 0, 1, 1])
    with sampler.units(batch):
        sft_unit_losses(model, examples, batch, sampler.head_sink).sum().backward()
    norms = sampler.clip_and_accumulate(0.5)
    got = sampler.take_clipped_sum()
    torch.testing.assert_close(norms, torch.stack(naive_norms), rtol=1e-5, atol=1e-7)
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected, strict=True):
        assert (got[id(p)] - e).norm() <= 1e-5 * e.norm() + 1e-9


def test_units_must_be_contiguous():
    model, tokenizer = tiny(lora=False)
    with pytest.raises(ValueError, match="contiguous"):
        example_batch(sft_examples(tokenizer, 3), 1, item_unit=[0, 1, 0])


def test_gradient_checkpointing_gives_the_same_clipped_sum():
    """Recomputed activations (non-reentrant checkpointing, as train.gradient_checkpointing
    sets it up) must not change the per-unit gradients."""
    model, tokenizer = tiny(lora=False)
    reference = copy.deepcopy(model).eval()
    units = pairs(tokenizer, 4)

    def unit_loss(chunk):
        return dpo_unit_losses(model, reference, chunk)

    expected, naive_norms = naive_clipped_sum(model, unit_loss, units, 0.5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sampler = PerUnitGradients(model)
    batch = unit_batch("dpo", units, "packed-shared")
    with sampler.units(batch):
        dpo_unit_losses(model, reference, units, batch, sampler.head_sink).sum().backward()
    norms = sampler.clip_and_accumulate(0.5)
    got = sampler.take_clipped_sum()
    torch.testing.assert_close(norms, torch.stack(naive_norms), rtol=1e-5, atol=1e-7)
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected, strict=True):
        assert (got[id(p)] - e).norm() <= 1e-5 * e.norm() + 1e-9


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointed_layers_keep_no_input_for_the_backward(lora):
    """Under gradient checkpointing the inputs the per-unit gradients need are recomputed
    with their layer in the backward pass: after the forward pass no input of a Linear
    inside a decoder layer is still alive (it was, in a closure, for the whole micro-batch:
    what ran the 8B user-level run out of memory), and the clipped sums stay exact."""
    from torch.multiprocessing.reductions import StorageWeakRef

    model, tokenizer = tiny(lora=lora)
    reference = copy.deepcopy(model).eval()
    units = pairs(tokenizer, 4)
    expected, _ = naive_clipped_sum(
        model, lambda chunk: dpo_unit_losses(model, reference, chunk), units, 0.5
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sampler = PerUnitGradients(model)
    inputs = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            module.register_forward_hook(
                lambda m, args, out: inputs.append(StorageWeakRef(args[0].untyped_storage()))
            )
    batch = unit_batch("dpo", units, "packed-shared")
    with sampler.units(batch):
        losses = dpo_unit_losses(model, reference, units, batch, sampler.head_sink)
        alive = sum(not ref.expired() for ref in inputs)
        seen = len(inputs)
        losses.sum().backward()
    assert seen > 0 and alive == 0, f"{alive} of {seen} layer inputs kept past the forward"
    sampler.clip_and_accumulate(0.5)
    got = sampler.take_clipped_sum()
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected, strict=True):
        assert (got[id(p)] - e).norm() <= 1e-5 * e.norm() + 1e-9


def test_autograd_weight_gradients_are_skipped_and_restored():
    """Inside `units`, autograd computes no batch weight gradient (the samplers do the
    work); afterwards the parameters are trainable again."""
    model, tokenizer = tiny(lora=False)
    examples = sft_examples(tokenizer, 3)
    sampler = PerUnitGradients(model)
    batch = unit_batch("sft", examples, "packed")
    with sampler.units(batch):
        sft_unit_losses(model, examples, batch, sampler.head_sink).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in sampler.params)
    assert len(sampler.per_unit()) == len(sampler.params)


@pytest.mark.parametrize("ghost", [False, True], ids=["per-unit", "ghost"])
def test_bfloat16_clipped_units_stay_within_the_norm(ghost):
    """In bfloat16 the clip factor is rounded down (and ghost norms inflated), so a
    clipped unit never exceeds C."""
    model, tokenizer = tiny(lora=False)
    model.to(torch.bfloat16)
    examples = sft_examples(tokenizer, 4)
    sampler = PerUnitGradients(model, ghost=ghost)
    for i in range(4):  # one unit at a time: each clipped sum is one clipped gradient
        batch = unit_batch("sft", examples[i : i + 1], "packed")
        with sampler.units(batch):
            sft_unit_losses(model, examples[i : i + 1], batch, sampler.head_sink).sum().backward()
        norm = sampler.clip_and_accumulate(1e-3)
        assert norm.item() > 1e-2  # really clipped
        clipped = sampler.take_clipped_sum()
        total = torch.sqrt(sum(t.double().pow(2).sum() for t in clipped.values()))
        assert 0.95e-3 < total.item() <= 1e-3


def test_ghost_clipping_keeps_no_per_unit_copy_of_the_vocabulary_layers():
    """With ghost clipping the tied embedding/head gets no [U, vocab, hidden] tensor."""
    model, tokenizer = tiny(lora=False)
    examples = sft_examples(tokenizer, 3)
    sampler = PerUnitGradients(model, ghost=True)
    batch = unit_batch("sft", examples, "packed")
    with sampler.units(batch):
        sft_unit_losses(model, examples, batch, sampler.head_sink).sum().backward()
        tied = model.get_input_embeddings().weight
        assert id(tied) not in sampler.per_unit()
        assert len(sampler.per_unit()) == len(sampler.params) - 1
