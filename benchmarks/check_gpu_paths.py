"""The CUDA-only paths checked against the CPU-tested reference, on a GPU (CI has none).

- varlen FlashAttention (and FlexAttention) on packed, prompt-sharing batches against the
  dense-mask SDPA path: per-sequence log-probs and gradients, bf16 and fp32-accumulated;
- the chunked head's float32 accumulation of the weight gradient (`addmm(out_dtype=)`);
- DP clipped sums on the GPU, ghost clipping on and off, against each other and against
  plain autograd one pair at a time, and with compiled layers against eager ones.

    PYTHONPATH=src python benchmarks/check_gpu_paths.py
Prints one line per check and exits non-zero if one fails.
"""

from __future__ import annotations

import random
import sys

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from privdpo.attention import _VARLEN, _VARLEN_PARAMS, register
from privdpo.data.batching import pair_batch
from privdpo.data.preference import PairExample
from privdpo.logprobs import add_product, sequence_logps
from privdpo.models import compile_layers
from privdpo.privacy.clipping import PerUnitGradients, _weighted_sum


def model(dtype):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    m = AutoModelForCausalLM.from_config(config, dtype=dtype).cuda().train()
    m.set_attn_implementation(register())
    return m


def pairs(n=6, seed=0):
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(4096) for _ in range(k)]

    return [
        PairExample(
            ids(rng.randint(20, 200)),
            ids(rng.randint(5, 150)),
            ids(rng.randint(5, 150)),
            f"p{i}",
            None,
        )
        for i in range(n)
    ]


def grads_of(m, batch, attention, weights):
    m.zero_grad(set_to_none=True)
    logps, _ = sequence_logps(m, batch, attention=attention)
    (logps * weights).sum().backward()
    return logps.detach(), torch.cat([p.grad.flatten().float() for p in m.parameters()])


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    failures = 0

    def check(name, value, limit):
        nonlocal failures
        ok = value <= limit
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (limit {limit:g})", flush=True)

    varlen = _VARLEN
    print("varlen_attn:", None if varlen is None else sorted(_VARLEN_PARAMS))
    ps = pairs()
    weights = torch.linspace(-1, 1, 2 * len(ps), device="cuda")
    for dtype, limit in ((torch.float32, 2e-4), (torch.bfloat16, 2e-2)):
        m = model(dtype)
        dense = pair_batch(ps, 0).to("cuda")
        ref_logps, ref_grads = grads_of(m, dense, "sdpa", weights)
        padded = pair_batch(ps, 0, "padded", False).to("cuda")
        lp, g = grads_of(m, padded, "auto", weights)
        check(f"{dtype} padded vs packed-sdpa logps", rel(lp, ref_logps), limit)
        check(f"{dtype} padded vs packed-sdpa grads", rel(g, ref_grads), 5 * limit)
        for backend in ("varlen", "flex"):
            if backend == "varlen" and (varlen is None or dtype == torch.float32):
                continue
            try:
                lp, g = grads_of(m, dense, backend, weights)
            except Exception as e:  # report and go on: the benchmark says which backend runs
                failures += 1
                print(f"FAIL {dtype} {backend}: {type(e).__name__}: {e}"[:400], flush=True)
                continue
            check(f"{dtype} {backend} vs sdpa logps", rel(lp, ref_logps), limit)
            check(f"{dtype} {backend} vs sdpa grads", rel(g, ref_grads), 5 * limit)

    # train.compile: each layer one graph with the packed attention traced inside it, over
    # batches of other lengths without recompiling
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = model(torch.bfloat16)
    compile_layers(m)
    for seed in range(3):
        batch = pair_batch(pairs(seed=seed), 0).to("cuda")
        ref_logps, ref_grads = grads_of(m, batch, "sdpa", weights)
        lp, g = grads_of(m, batch, "auto", weights)
        check(f"compiled layers, auto vs sdpa logps (batch {seed})", rel(lp, ref_logps), 2e-2)
        check(f"compiled layers, auto vs sdpa grads (batch {seed})", rel(g, ref_grads), 1e-1)
    breaks = sum(counters["graph_break"].values())
    check("compiled layers: graph breaks", breaks, 0)
    check("compiled layers: graphs for sdpa and varlen", counters["stats"]["unique_graphs"], 2)

    # float32 accumulation of bf16 products
    a = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(4096, 256, device="cuda")
    try:
        add_product(acc, a, b)
        check("add_product vs fp32 matmul", rel(acc, a.float() @ b.float()), 1e-5)
    except Exception as e:
        failures += 1
        print(f"FAIL add_product: {type(e).__name__}: {e}"[:300])

    # the clipped sum's bf16 products, accumulated and written in float32 by cuBLAS
    # (out_dtype, the sum updated in place as `out`): two micro-batches into one sum
    into = None
    expected = torch.zeros(1, 896 * 4864, device="cuda", dtype=torch.float64)
    for seed in (0, 1):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.rand(1, 8, device="cuda", generator=gen).bfloat16()
        g = torch.randn(8, 896 * 4864, device="cuda", generator=gen).bfloat16()
        into = _weighted_sum(w, g, into)
        expected += w.double() @ g.double()
    check("clipped sum, bf16 products into float32, two calls", rel(into, expected), 1e-6)

    # DP on the GPU: ghost and per-unit clipped sums agree (fp32)
    m = model(torch.float32)
    ref_model = model(torch.float32).eval()
    batch_host = pair_batch(ps, 0, item_unit=list(range(len(ps))))
    batch = batch_host.to("cuda")

    def dpo_loss_backward(pairs_batch, sink=None):
        """The summed sigmoid DPO loss (beta 0.1) of `pairs_batch`, backpropagated."""
        logps, _ = sequence_logps(m, pairs_batch, sink)
        with torch.no_grad():
            ref, _ = sequence_logps(ref_model, pairs_batch)
        margin = (logps - ref).chunk(2)
        (-torch.nn.functional.logsigmoid(0.1 * (margin[0] - margin[1]))).sum().backward()

    sums = {}
    for ghost in (False, True):
        clipper = PerUnitGradients(m, ghost=ghost)
        with clipper.units(batch_host):
            dpo_loss_backward(batch, clipper.head_sink)
        norms = clipper.clip_and_accumulate(0.5)
        total = clipper.take_clipped_sum()
        sums[ghost] = (norms, torch.cat([total[id(p)].flatten() for p in clipper.params]))
        clipper.detach()
    check("ghost vs per-unit norms (GPU)", rel(sums[True][0], sums[False][0]), 1e-4)
    check("ghost vs per-unit clipped sum (GPU)", rel(sums[True][1], sums[False][1]), 1e-4)

    # ... and the per-unit path against plain autograd, one pair at a time (the norm weights'
    # and biases' per-unit sums, the batched weight products and the flat buffers on CUDA)
    params = [p for p in m.parameters() if p.requires_grad]
    naive_norms, naive_sum = [], torch.zeros_like(sums[False][1])
    for pair in ps:
        m.zero_grad(set_to_none=True)
        dpo_loss_backward(pair_batch([pair], 0, item_unit=[0]).to("cuda"))
        grad = torch.cat([p.grad.flatten() for p in params])
        naive_norms.append(grad.double().norm().float())  # fp32 over 2M values drifts
        naive_sum += grad * (0.5 / (naive_norms[-1] + 1e-6)).clamp(max=1.0)
    check(
        "per-unit vs autograd loop norms (GPU)", rel(sums[False][0], torch.stack(naive_norms)), 1e-4
    )
    check("per-unit vs autograd loop clipped sum (GPU)", rel(sums[False][1], naive_sum), 1e-4)

    # ... and with compiled layers (train.compile, auto on a GPU): each layer computes its
    # per-unit gradients in its own graph; a second batch of other lengths and unit count
    def clipped(pairs_list, ghost=False):
        host = pair_batch(pairs_list, 0, item_unit=list(range(len(pairs_list))))
        clipper = PerUnitGradients(m, ghost=ghost)
        with clipper.units(host):
            dpo_loss_backward(host.to("cuda"), clipper.head_sink)
        norms = clipper.clip_and_accumulate(0.5)
        total = clipper.take_clipped_sum()
        clipper.detach()
        return norms, torch.cat([total[id(p)].flatten() for p in params])

    other = pairs(4, seed=7)
    eager_other = clipped(other)
    compile_layers(m, fresh=True)
    counters.clear()
    for name, pairs_list, expected in (
        ("batch 0", ps, sums[False]),
        ("batch 1", other, eager_other),
    ):
        norms, total = clipped(pairs_list)
        check(f"compiled DP vs eager norms ({name})", rel(norms, expected[0]), 1e-4)
        check(f"compiled DP vs eager clipped sum ({name})", rel(total, expected[1]), 1e-4)
    check("compiled DP: graph breaks", sum(counters["graph_break"].values()), 0)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
