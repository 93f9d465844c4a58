"""Profile one batch of each pass kind with ``torch.profiler`` and print where the CPU time goes.

Usage: ``python scripts/profile_passes.py [--model M] [--dtype bfloat16] [--n 8] [--top 6]``.

For each pass (last-position logits, greedy generation, a context-cached steered score pass, a stacked patch pass,
continuation log-likelihoods) it prints the wall time, the share of CPU time in ``aten::copy_``, every matrix
product whose operands include the vocabulary dimension (the LM head: it should be one ``aten::mm``/``addmm`` of
``[rows, d_model] x [d_model, vocab]``, never an ``aten::bmm`` over a weight expanded across the batch), and the
top operators. This is how issue 10's bfloat16 slow path (89 % of a logits pass in ``aten::copy_`` inside the LM
head's ``bmm`` on a CPU with native bfloat16) was found; run it on the CPU in question.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=8, help="prompts (one batch)")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from toolkit.interventions import activation_addition
    from toolkit.models import load_model
    from toolkit.patching import Component, run_patching
    from toolkit.prompts import load_prompt_set
    from toolkit.runner import Runner
    from toolkit.scoring import refusal_token_ids
    from toolkit.templates import ChatFormat

    lm = load_model(args.model, dtype=args.dtype, device="cpu")
    fmt = ChatFormat(lm.tokenizer)
    r = Runner(lm, fmt, batch_size=args.n, progress=False)
    enc = r.encode(load_prompt_set("harmful").select("train").prompts[: args.n])
    L, post, ids = lm.n_layers, fmt.post_positions(), refusal_token_ids(lm.tokenizer)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    ctx = r.context(enc, len(post), start_layer=L // 2)

    def steered():
        with activation_addition(lm.model, v, [L // 2], alpha=1.0, positions=post):
            r.logits(enc, context=ctx)

    kinds = {
        "logits": lambda: r.logits(enc),
        "generate 4 tokens": lambda: r.generate(enc, 4),
        "steered score pass [context cache]": steered,
        "patch 4 components [stacked, context-cached]": lambda: run_patching(
            r, enc, enc, [Component("resid_pre", l, (-1,)) for l in range(L // 2, L // 2 + 4)], ids, ("denoise",)),
        "continuation log-likelihood, 8 tokens": lambda: r.continuation_logprob(enc, [[ids[0]] * 8] * len(enc)),
    }
    print(f"{lm.describe()['architecture']} in {args.dtype}, {args.n} prompts, {torch.get_num_threads()} threads")
    for name, fn in kinds.items():
        fn()  # warm-up
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        wall = time.perf_counter() - t
        ev = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in ev) or 1
        copy = sum(e.self_cpu_time_total for e in ev if e.key == "aten::copy_")
        print(f"\n== {name}: {wall:.2f} s (profiled); aten::copy_ {100 * copy / total:.1f} % of CPU time")
        for e in ev:
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul") and any(
                    s and s[-1] == vocab for s in e.input_shapes):
                print(f"   LM head: {e.key} {e.input_shapes} x{e.count}, {e.self_cpu_time_total / 1e3:.0f} ms")
        for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"   {100 * e.self_cpu_time_total / total:5.1f} %  {e.key} {e.input_shapes}")


if __name__ == "__main__":
    main()
