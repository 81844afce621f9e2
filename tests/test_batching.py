"""Packed and padded batches: their layout by hand, and that packing (with the prompt
shared per pair or not), the padded rows and the chunked head give the same per-sequence
log-probs, losses and gradients as the full-logits reference, for SFT and DPO (fp32)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from privdpo import logprobs
from privdpo.attention import PackedAttention
from privdpo.data.batching import example_batch, pair_batch, token_count
from privdpo.data.preference import PairExample
from privdpo.data.sft import Example
from privdpo.data.tokenize import IGNORE
from privdpo.logprobs import LabelLogps, label_logps, sequence_logps
from privdpo.losses import LossParams, PairLogps, sigmoid_loss
from privdpo.models import build_preset
from privdpo.training import micro_batches

X = IGNORE


# ---- layout, by hand ----------------------------------------------------------------------


def test_packed_pairs_share_the_prompt():
    a = PairExample([10, 11, 12], [20, 21], [30], "a", None)
    b = PairExample([40], [50, 51, 52, 53], [60, 61], "b", None)
    batch = pair_batch([a, b], pad_id=0, item_unit=[0, 1])
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 40, 50, 51, 52, 53, 60, 61]]
    # The rejected response continues the prompt's positions, not the chosen one's.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 1, 2]]
    assert batch.segment.tolist() == [0] * 6 + [1] * 7
    assert batch.branch.tolist() == [0, 0, 0, 1, 1, 2, 0, 1, 1, 1, 1, 2, 2]
    # Each label is predicted by the token before it in its own sequence: the first
    # rejected token by the prompt's last token (index 2), not by the chosen's (4).
    assert batch.label_target.tolist() == [20, 21, 30, 50, 51, 52, 53, 60, 61]
    assert batch.label_source.tolist() == [2, 3, 2, 6, 7, 8, 9, 6, 11]
    # Sequences 0..B-1 are the chosen responses, B..2B-1 the rejected ones.
    assert batch.label_sequence.tolist() == [0, 0, 2, 1, 1, 1, 1, 3, 3]
    assert batch.sequence_tokens.tolist() == [2, 4, 1, 2]
    assert batch.num_tokens == 13 == token_count(a) + token_count(b)
    # Query blocks: prompt + chosen attend to themselves; rejected to prompt + itself.
    assert batch.query_lengths == [5, 1, 5, 2]
    assert batch.key_lengths == [5, 4, 5, 3]
    assert batch.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 10, 6, 11, 12]
    assert batch.unit_tokens == [0, 6, 13] and batch.unit_labels == [0, 3, 9]
    mask = PackedAttention(batch, "sdpa").dense_mask("cpu")[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True] + [False] * 7
    assert not mask[6, :6].any()  # nothing crosses into another segment


def test_padded_pairs_are_one_row_per_sequence():
    a = PairExample([10, 11, 12], [20, 21], [30], "a", None)
    b = PairExample([40], [50, 51, 52, 53], [60, 61], "b", None)
    batch = pair_batch([a, b], pad_id=0, layout="padded", share_prompt=False, item_unit=[0, 1])
    # Rows: a's chosen and rejected, then b's: each pair's rows adjacent (one unit range).
    assert batch.input_ids.tolist() == [
        [10, 11, 12, 20, 21],
        [10, 11, 12, 30, 0],
        [40, 50, 51, 52, 53],
        [40, 60, 61, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]
    assert batch.label_source.tolist() == [2, 3, 7, 10, 11, 12, 13, 15, 16]
    assert batch.label_sequence.tolist() == [0, 0, 2, 1, 1, 1, 1, 3, 3]
    assert batch.unit_tokens == [0, 10, 20] and batch.unit_labels == [0, 3, 9]
    with pytest.raises(ValueError, match="packed"):
        pair_batch([a], pad_id=0, layout="padded", share_prompt=True)


def test_packed_examples_label_only_their_label_tokens():
    examples = [Example([5, 6, 7], [X, 6, 7], "a", None), Example([8, 9], [8, 9], "b", None)]
    batch = example_batch(examples, pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # A sequence's first token is never a target, whatever its label says.
    assert batch.label_target.tolist() == [6, 7, 9]
    assert batch.label_source.tolist() == [0, 1, 3]
    assert batch.sequence_tokens.tolist() == [2, 1]
    assert batch.key_index is None  # every block attends to its own tokens


def test_token_budget_micro_batches():
    items = [5, 3, 4, 9, 1, 1]
    got = micro_batches(items, size=3, max_tokens=8, tokens_of=lambda n: n)
    assert got == [[5, 3], [4], [9], [1, 1]]
    assert micro_batches(items, size=4) == [[5, 3, 4, 9], [1, 1]]


# ---- equal numbers ------------------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    model, _ = build_preset("tiny")
    return model.train()


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[PairExample]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(4, vocab) for _ in range(k)]

    return [
        PairExample(
            ids(rng.randint(1, 9)), ids(rng.randint(1, 7)), ids(rng.randint(1, 7)), f"p{i}", None
        )
        for i in range(n)
    ]


def full_logits_logps(model, sequences: list[tuple[list[int], int]]) -> torch.Tensor:
    """The reference: one sequence at a time through the model's own forward, full logits,
    log_softmax; summed over the tokens from `start` on."""
    out = []
    for ids, start in sequences:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
        out.append(logps.squeeze(1)[max(start, 1) - 1 :].sum())
    return torch.stack(out)


def pair_sequences(pairs):
    return [
        (p.prompt_ids + getattr(p, side), len(p.prompt_ids))
        for side in ("chosen_ids", "rejected_ids")
        for p in pairs
    ]


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


LAYOUTS = [("packed", True), ("packed", False), ("padded", False)]


@pytest.mark.parametrize(("layout", "share"), LAYOUTS, ids=["shared", "packed", "padded"])
def test_dpo_logps_loss_and_gradients_equal_the_full_logits_reference(layout, share):
    model = tiny_model()
    reference = copy.deepcopy(model).eval()
    pairs = random_pairs(5, model.config.vocab_size)

    def loss_of(logps, ref):
        c, r = logps.chunk(2)
        rc, rr = ref.chunk(2)
        ones = torch.ones_like(c)
        return sigmoid_loss(PairLogps(c, r, ones, ones, rc, rr), LossParams(beta=0.3)).losses

    with torch.no_grad():
        ref = full_logits_logps(reference, pair_sequences(pairs))
    want = full_logits_logps(model, pair_sequences(pairs))
    want_loss = loss_of(want, ref)
    model.zero_grad()
    want_loss.sum().backward()
    want_grad = grads(model)

    batch = pair_batch(pairs, 0, layout, share)
    got, tokens = sequence_logps(model, batch)
    got_loss = loss_of(got, ref)
    model.zero_grad()
    got_loss.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert (grads(model) - want_grad).norm() <= 1e-5 * want_grad.norm()
    lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert tokens.tolist() == lengths


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_sft_logps_and_gradients_equal_the_full_logits_reference(layout):
    model = tiny_model()
    rng = random.Random(1)
    examples = []
    for i in range(5):
        ids = [rng.randrange(4, model.config.vocab_size) for _ in range(rng.randint(3, 12))]
        start = rng.randint(1, len(ids) - 1)
        examples.append(Example(ids, [X] * start + ids[start:], f"e{i}", None))
    starts = [next(t for t, label in enumerate(e.labels) if label != X) for e in examples]
    want = full_logits_logps(
        model, [(e.input_ids, s) for e, s in zip(examples, starts, strict=True)]
    )
    model.zero_grad()
    (want * torch.arange(1.0, 6.0)).sum().backward()
    want_grad = grads(model)
    got, _ = sequence_logps(model, example_batch(examples, 0, layout))
    model.zero_grad()
    (got * torch.arange(1.0, 6.0)).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (grads(model) - want_grad).norm() <= 1e-5 * want_grad.norm()


@pytest.mark.parametrize("tile", [8, 16, 48, 64], ids=lambda t: f"tile-{t}")
def test_tiled_head_equals_full_logits_in_every_tile_size(monkeypatch, tile):
    """Vocabulary tiles of 8 to 64 columns (a 50-token vocabulary: uneven last tiles,
    targets in every tile, one tile for all)."""
    monkeypatch.setattr(logprobs, "MIN_TILE", tile)
    monkeypatch.setattr(logprobs, "TILE_BYTES", 1)
    assert len(logprobs.vocab_tiles(50, 37)) == -(-50 // tile)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True)
    target = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    logits = head(hidden).float()
    want = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    (want * upstream).sum().backward()
    want_grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    got = LabelLogps.apply(hidden, head.weight, head.bias, target, None, False)
    (got * upstream).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for t, w in zip((hidden, head.weight, head.bias), want_grads, strict=True):
        torch.testing.assert_close(t.grad, w, rtol=1e-5, atol=1e-6)


def test_a_head_that_is_not_a_plain_linear_runs_in_checkpointed_chunks():
    torch.manual_seed(0)
    hidden = torch.randn(9, 8, requires_grad=True)
    head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 30))
    head.weight = head[1].weight  # what label_logps reads for the vocabulary size
    target = torch.randint(0, 30, (9,))
    want = torch.log_softmax(head(hidden), -1).gather(1, target[:, None]).squeeze(1)
    got = label_logps(hidden, head, target)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert hidden.grad is not None


def test_flex_attention_equals_the_dense_mask():
    """FlexAttention's block mask (forward; FlexAttention has no CPU backward) gives the
    same numbers as the dense SDPA mask on a packed, prompt-sharing batch."""
    model = tiny_model().eval()
    pairs = random_pairs(4, model.config.vocab_size, seed=3)
    batch = pair_batch(pairs, 0)
    with torch.no_grad():
        dense, _ = sequence_logps(model, batch, attention="sdpa")
        flex, _ = sequence_logps(model, batch, attention="flex")
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_a_compiled_layer_traces_the_packed_attention_in_its_graph():
    """train.compile: the packed layout reaches each decoder layer as tensors and integers
    (`privdpo_layout`), so every layer is one graph, attention included (no graph break),
    with the eager model's log-probs and gradients; a new batch's lengths reuse it."""
    from torch._dynamo.utils import counters

    from privdpo.models import compile_layers

    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(compiled)
    for seed in (0, 1):
        batch = pair_batch(random_pairs(4, eager.config.vocab_size, seed), 0)
        logps = []
        for model in (eager, compiled):
            model.zero_grad()
            logps.append(sequence_logps(model, batch)[0])
            logps[-1].sum().backward()
        torch.testing.assert_close(logps[1], logps[0], rtol=1e-5, atol=1e-5)
        assert (grads(compiled) - grads(eager)).norm() <= 1e-5 * grads(eager).norm()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one layer's graph, shared by all


def test_a_layer_that_drops_the_layout_argument_reads_it_from_the_mask():
    """A model whose layers do not pass keyword arguments on to attention still attends
    within segments: the layout also rides on the mask."""
    from privdpo.attention import PackedAttention, mask_argument, privdpo_attention

    model = tiny_model()
    batch = pair_batch(random_pairs(3, model.config.vocab_size, seed=2), 0)
    packed = PackedAttention(batch, "sdpa")
    q, k, v = (torch.randn(1, h, batch.num_tokens, 8) for h in (4, 2, 2))
    layout = packed.layout("cpu", torch.float32, 0.0)
    want, _ = privdpo_attention(None, q, k, v, None, privdpo_layout=layout)
    got, _ = privdpo_attention(None, q, k, v, mask_argument(packed, "cpu"))
    torch.testing.assert_close(got, want)
    assert want.shape == (1, batch.num_tokens, 4, 8)
