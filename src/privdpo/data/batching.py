"""Turning tokenized examples and pairs into the tensors of one forward pass.

Two layouts, one `TokenBatch`:
- `packed` (the default): every sequence of the micro-batch is concatenated into a single
  row with no padding; each sequence restarts its `position_ids` at 0, and attention
  never crosses from one sequence into another (`privdpo.attention`). With
  `share_prompt`, a preference pair is one segment `[prompt, chosen, rejected]`: the
  prompt is run once, the rejected tokens continue the prompt's positions and attend to
  the prompt and to themselves, never to the chosen response (prefix sharing).
- `padded`: one right-padded row per sequence, with a 2D attention mask, for model code
  that cannot take packed sequences.

In both, the label tokens are described by flat index arrays over the [rows * width]
token axis: where each label token's predicting hidden state is, which token it is, and
which sequence it belongs to. `privdpo.logprobs` then runs the language-model head only
at those positions. For differential privacy, the items of one privacy unit sit next to
each other, so each unit is one contiguous range of tokens and of label tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from privdpo.data.tokenize import IGNORE

LAYOUTS = ("packed", "padded")


@dataclass
class TokenBatch:
    """One forward pass. Tensors live on the host until `to(device)`.

    input_ids, position_ids: [R, T] (R = 1 when packed).
    attention_mask: [R, T] 1 on real tokens (padded layout); None when packed.
    label_source: [N] index into the flat [R * T] token axis of the hidden state that
        predicts each label token (the token before it in its own sequence).
    label_target: [N] the label token ids.
    label_sequence: [N] the sequence (0..S-1) of each label token.
    sequence_tokens: [S] float32 label tokens per sequence.
    Packed attention, per token [L]: `segment` (which packed segment) and `branch` (0 for
    a shared prefix, 1, 2, ... for the continuations that follow it); and per query
    block (a run of query tokens with one key set): `query_lengths`, `key_lengths`, and
    `key_index` [sum of key_lengths] (the tokens each block attends to, in order; None
    when every block attends to exactly its own tokens).
    unit_tokens, unit_labels: offsets [U + 1] of each privacy unit's tokens on the flat
        token axis and of its label tokens (DP only; None otherwise).
    num_tokens: real (non-padding) tokens in the pass.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    label_source: torch.Tensor
    label_target: torch.Tensor
    label_sequence: torch.Tensor
    sequence_tokens: torch.Tensor
    num_tokens: int
    segment: torch.Tensor | None = None
    branch: torch.Tensor | None = None
    query_lengths: list[int] | None = None
    key_lengths: list[int] | None = None
    key_index: torch.Tensor | None = None
    unit_tokens: list[int] | None = None
    unit_labels: list[int] | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_tokens)

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    def to(self, device: torch.device) -> TokenBatch:
        """A copy with every tensor on `device` (pinned, non-blocking copies to a GPU)."""
        cuda = torch.device(device).type == "cuda"

        def move(value):
            if not isinstance(value, torch.Tensor):
                return value
            if cuda:
                return value.pin_memory().to(device, non_blocking=True)
            return value.to(device)

        return TokenBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class _Group:
    """A packed segment: a prefix, then continuations that each attend to the prefix and
    to themselves. Labels are aligned with tokens (IGNORE where there is no loss); each
    part carries the sequence its labels count for."""

    prefix: list[int]
    prefix_labels: list[int]
    prefix_sequence: int | None
    continuations: list[tuple[list[int], int]]  # (tokens, sequence); every token a label


def _example_groups(examples) -> list[_Group]:
    return [_Group(list(e.input_ids), list(e.labels), i, []) for i, e in enumerate(examples)]


def _pair_groups(pairs, share_prompt: bool) -> list[_Group]:
    """Pair i's chosen response is sequence i, its rejected one sequence B + i (the order
    TRL uses). A pair's groups are adjacent, so its tokens form one range."""
    b = len(pairs)
    groups = []
    for i, p in enumerate(pairs):
        prompt = list(p.prompt_ids)
        if share_prompt:
            groups.append(
                _Group(
                    prompt,
                    [IGNORE] * len(prompt),
                    None,
                    [(p.chosen_ids, i), (p.rejected_ids, b + i)],
                )
            )
            continue
        for response, sequence in ((p.chosen_ids, i), (p.rejected_ids, b + i)):
            groups.append(
                _Group(prompt + response, [IGNORE] * len(prompt) + list(response), sequence, [])
            )
    return groups


def _group_lengths(group: _Group) -> int:
    return len(group.prefix) + sum(len(t) for t, _ in group.continuations)


def token_count(item, share_prompt: bool = True) -> int:
    """Tokens an example or a pair puts into a packed batch."""
    if hasattr(item, "prompt_ids"):
        responses = len(item.chosen_ids) + len(item.rejected_ids)
        prompts = 1 if share_prompt else 2
        return prompts * len(item.prompt_ids) + responses
    return len(item.input_ids)


def example_batch(examples, pad_id: int, layout: str = "packed", item_unit=None) -> TokenBatch:
    """The batch of SFT examples (`input_ids`, `labels`); sequence i is example i."""
    return _build(_example_groups(examples), len(examples), pad_id, layout, item_unit, 1)


def pair_batch(
    pairs, pad_id: int, layout: str = "packed", share_prompt: bool = True, item_unit=None
) -> TokenBatch:
    """The batch of preference pairs: sequences 0..B-1 are the chosen responses, B..2B-1
    the rejected ones, labels only on response tokens. `share_prompt` (packed layout
    only) runs each prompt once for both responses."""
    if layout == "padded" and share_prompt:
        raise ValueError("share_prompt needs the packed layout; pass share_prompt=False")
    groups = _pair_groups(pairs, share_prompt)
    return _build(groups, 2 * len(pairs), pad_id, layout, item_unit, 1 if share_prompt else 2)


def _build(groups, num_sequences, pad_id, layout, item_unit, groups_per_item) -> TokenBatch:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    packed = layout == "packed"
    width = sum(map(_group_lengths, groups)) if packed else max(map(_group_lengths, groups))
    rows = 1 if packed else len(groups)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    source, target, sequence = [], [], []
    segment, branch = [], []
    query_lengths, key_lengths, key_index = [], [], []
    group_start = []  # flat offset of each group's first token
    group_label_start = []
    shared = False
    offset = 0
    for g, group in enumerate(groups):
        base = offset if packed else g * width
        group_start.append(base)
        group_label_start.append(len(source))
        row, col = divmod(base, width)
        p = len(group.prefix)
        tokens = list(group.prefix)
        positions = list(range(p))
        for t in range(1, p):  # the first token of a sequence is never a target
            if group.prefix_labels[t] != IGNORE:
                source.append(base + t - 1)
                target.append(group.prefix_labels[t])
                sequence.append(group.prefix_sequence)
        segment += [g] * p
        branch += [0] * p
        start = p
        for c, (cont, seq) in enumerate(group.continuations):
            for k, tok in enumerate(cont):
                before = (base + p - 1) if k == 0 else (base + start + k - 1)
                if k > 0 or p > 0:
                    source.append(before)
                    target.append(tok)
                    sequence.append(seq)
            tokens += cont
            positions += range(p, p + len(cont))
            segment += [g] * len(cont)
            branch += [c + 1] * len(cont)
            if c == 0:  # the prefix and the first continuation are one causal block
                query_lengths.append(p + len(cont))
                key_lengths.append(p + len(cont))
                key_index += range(base, base + p + len(cont))
            else:  # later ones see the prefix, then themselves
                shared = True
                query_lengths.append(len(cont))
                key_lengths.append(p + len(cont))
                key_index += range(base, base + p)
                key_index += range(base + start, base + start + len(cont))
            start += len(cont)
        if not group.continuations:
            query_lengths.append(p)
            key_lengths.append(p)
            key_index += range(base, base + p)
        n = len(tokens)
        input_ids[row, col : col + n] = torch.tensor(tokens, dtype=torch.long)
        position_ids[row, col : col + n] = torch.tensor(positions, dtype=torch.long)
        offset += n
    counts = torch.zeros(num_sequences, dtype=torch.float32)
    label_sequence = torch.tensor(sequence, dtype=torch.long)
    counts.index_add_(0, label_sequence, torch.ones(len(sequence)))
    batch = TokenBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=None,
        label_source=torch.tensor(source, dtype=torch.long),
        label_target=torch.tensor(target, dtype=torch.long),
        label_sequence=label_sequence,
        sequence_tokens=counts,
        num_tokens=offset,
    )
    if packed:
        batch.segment = torch.tensor(segment, dtype=torch.long)
        batch.branch = torch.tensor(branch, dtype=torch.long)
        batch.query_lengths = query_lengths
        batch.key_lengths = key_lengths
        batch.key_index = torch.tensor(key_index, dtype=torch.long) if shared else None
    else:
        lengths = torch.tensor([_group_lengths(g) for g in groups])
        batch.attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    if item_unit is not None:
        batch.unit_tokens, batch.unit_labels = _unit_offsets(
            item_unit, groups_per_item, group_start, group_label_start, rows * width, len(source)
        )
    return batch


def _unit_offsets(item_unit, groups_per_item, group_start, group_label_start, tokens, labels):
    """Offsets of each unit's token range and label range. Units must be contiguous and
    numbered 0, 1, ... in order (as `DPSGD.micro_batches` yields them)."""
    units = [int(u) for u in item_unit]
    if units != sorted(units) or (units and (units[0] != 0 or len(set(units)) != units[-1] + 1)):
        raise ValueError(f"item_unit must number contiguous units 0, 1, ... in order, got {units}")
    token_offsets, label_offsets = [], []
    for i, u in enumerate(units):
        if i == 0 or units[i - 1] != u:
            token_offsets.append(group_start[i * groups_per_item])
            label_offsets.append(group_label_start[i * groups_per_item])
    return token_offsets + [tokens], label_offsets + [labels]
