"""Sampling completions, scoring them, and the sequence-level KL between two policies.

Two estimates of KL(pi || pi_ref) from completions sampled from pi: `sequence_kl`, the
one-sample log-ratio of each whole completion, and `exact_sequence_kl`, the exact
next-token KL summed along each completion's prefixes (the same expectation, far lower
variance).

Generation is a plain loop with a KV cache over left-padded prompts, drawing every token
from one seeded `torch.Generator`: the same model, prompts, batch size and seed give the
same completions, on CPU bit for bit. Prompts and completions are token ids; a completion
ends with the EOS token that stopped it (that token's probability is part of the
sequence's), or after `max_new_tokens`.
"""

from __future__ import annotations

import torch

from privdpo.data.batching import example_batch
from privdpo.data.tokenize import IGNORE, Tokenized
from privdpo.logprobs import decoder_hidden, sequence_logps

# Positions whose next-token distributions are held at once by `exact_sequence_kl`:
# about this many bytes of float32 logits per model.
KL_CHUNK_BYTES = 2**25


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the model's generation config's EOS ids (a
    chat model often has several, e.g. <|im_end|>) and the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    return sorted(set(ids))


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row from next-token `logits` [B, V]: greedy at temperature 0, else a
    draw from softmax(logits / temperature) restricted to the top-p nucleus (the most
    likely tokens whose mass before them is below `top_p`). Returns [B] token ids."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
) -> list[list[int]]:
    """Sampled completion ids of each prompt (ids), in the order of `prompts`.

    Batches of `batch_size` prompts, left padded so that every row's next token is the
    last column; position ids count real tokens only, so padding does not shift them.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        next_position = positions[:, -1:] + 1
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        steps = []
        for step in range(max_new_tokens):
            token = sample_next(out.logits[:, -1, :], temperature, top_p, generator)
            token = token.masked_fill(done, pad_id)  # finished rows only pad
            steps.append(token)
            done |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):  # a CPU-GPU sync per token
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=next_position,
                use_cache=True,
                **_cache_argument(out),
            )
            next_position = next_position + 1
        tokens = torch.stack(steps, dim=1).tolist()
        for row in tokens:
            end = next((t + 1 for t, tok in enumerate(row) if tok in eos_ids), len(row))
            completions.append(row[:end])
    model.train(was_training)
    return completions


def _cache_argument(out) -> dict:
    """The key-value cache of `out`, as the next forward call takes it: `cache` in newer
    transformers (which deprecate `past_key_values`), `past_key_values` before."""
    if "cache" in getattr(type(out), "__dataclass_fields__", {}):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


@torch.no_grad()
def completion_logps(
    model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """log p(completion | prompt) under `model` at temperature 1, summed over the
    completion's tokens: [N] float32 on the CPU. Right padded, dropout off."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            Tokenized(p + c, [IGNORE] * len(p) + c)
            for p, c in zip(
                prompts[start : start + batch_size],
                completions[start : start + batch_size],
                strict=True,
            )
        ]
        logps, _ = sequence_logps(model, example_batch(rows, pad_id).to(device))
        out.append(logps.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def sequence_kl(
    policy,
    reference,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Per-sequence log-ratios log pi(y|x) - log pi_ref(y|x) of completions y sampled from
    the policy pi: [N] float32. Their mean is the Monte Carlo estimate of the sequence-level
    KL(pi || pi_ref) = E_{y ~ pi(.|x)}[log pi(y|x) - log pi_ref(y|x)], averaged over the
    prompts x.

    Unbiased only when y was drawn from pi itself: temperature 1, top_p 1. Completions cut
    at `max_new_tokens` make it the KL between the distributions of the first
    `max_new_tokens` tokens (a lower bound on the full KL). One sequence's log-ratio can be
    negative; the expectation cannot.
    """
    return completion_logps(policy, prompts, completions, pad_id, batch_size) - completion_logps(
        reference, prompts, completions, pad_id, batch_size
    )


@torch.no_grad()
def exact_sequence_kl(
    policy,
    reference,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    batch_size: int = 8,
    position_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion y of prompt x, the exact next-token KL summed along y:

        K(x, y) = sum_{t=1..|y|} sum_v pi(v | x, y_<t) log(pi(v | x, y_<t) / pi_ref(v | x, y_<t))

    at temperature 1, and the number of positions |y|: ([N], [N]) float32 on the CPU.

    For y drawn from pi (temperature 1, top_p 1), E_y[K(x, y)] = KL(pi(.|x) || pi_ref(.|x))
    over whole sequences (the chain rule of KL: the expected log-ratio of token t given its
    prefix is that prefix's next-token KL), so the mean of K is unbiased like the mean of
    `sequence_kl`'s log-ratios, with far lower variance: each term is an expectation over
    the vocabulary instead of one sampled token's log-ratio, and no term is negative. The
    same truncation caveat holds: completions cut at `max_new_tokens` give the KL of the
    first `max_new_tokens` tokens. K / |y| summed over sequences and divided by their
    tokens is the KL per token.

    Both models run on the same packed batches of `batch_size` sequences (decoder only);
    their heads are applied to the completion positions `position_chunk` positions at a
    time (default: about KL_CHUNK_BYTES of float32 logits each), so at most
    [position_chunk, vocab] logits per model exist at once, never [N, T, vocab].
    """
    policy_device = next(policy.parameters()).device
    reference_device = next(reference.parameters()).device
    policy_head, reference_head = policy.get_output_embeddings(), reference.get_output_embeddings()
    vocab = policy_head.weight.shape[0]
    if reference_head.weight.shape[0] != vocab:
        raise ValueError(
            f"the exact KL needs one vocabulary: the policy's head has {vocab} rows, the"
            f" reference's {reference_head.weight.shape[0]}"
        )
    chunk = position_chunk or max(1, KL_CHUNK_BYTES // (4 * vocab))
    modes = policy.training, reference.training
    policy.eval()
    reference.eval()
    kl_parts, token_parts = [], []
    for start in range(0, len(prompts), batch_size):
        rows = [
            Tokenized(p + c, [IGNORE] * len(p) + c)
            for p, c in zip(
                prompts[start : start + batch_size],
                completions[start : start + batch_size],
                strict=True,
            )
        ]
        batch = example_batch(rows, pad_id)
        # The hidden states that predict each completion token: [M, H] per model.
        h = decoder_hidden(policy, batch.to(policy_device)).index_select(
            0, batch.label_source.to(policy_device)
        )
        h_ref = decoder_hidden(reference, batch.to(reference_device)).index_select(
            0, batch.label_source.to(reference_device)
        )
        per_position = []
        for s in range(0, h.shape[0], chunk):
            logp = torch.log_softmax(policy_head(h[s : s + chunk]).float(), dim=-1)
            logq = torch.log_softmax(reference_head(h_ref[s : s + chunk]).float(), dim=-1)
            logq = logq.to(policy_device)
            per_position.append((logp.exp() * (logp - logq)).sum(-1).cpu())
        kl = torch.zeros(batch.num_sequences, dtype=torch.float32)
        if per_position:
            kl.index_add_(0, batch.label_sequence, torch.cat(per_position))
        kl_parts.append(kl)
        token_parts.append(batch.sequence_tokens.float())
    policy.train(modes[0])
    reference.train(modes[1])
    if not kl_parts:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(kl_parts), torch.cat(token_parts)
