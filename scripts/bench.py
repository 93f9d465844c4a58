"""Benchmark: activation-collection throughput (prompt tokens per second), steered scoring passes with and
without a context cache, and the demo's wall time.

Usage: ``python scripts/bench.py [--model M] [--n 64] [--batch-size 16] [--no-demo]``.
Throughput counts every prompt token (the shared template prefix once per prompt, as if it had been run), so
figures compare directly with a plain forward pass over the same prompts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--n", type=int, default=64, help="harmful train prompts to run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-demo", action="store_true", help="skip timing `just demo`")
    args = ap.parse_args()

    import torch

    from toolkit.models import load_model
    from toolkit.prompts import load_prompt_set
    from toolkit.runner import Runner
    from toolkit.templates import ChatFormat

    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype)
    print(f"model load: {time.perf_counter() - t0:.1f} s ({lm.describe()['architecture']}, {lm.dtype}, "
          f"{torch.get_num_threads()} threads)")
    fmt = ChatFormat(lm.tokenizer)
    prompts = load_prompt_set("harmful").select("train").prompts[: args.n]
    L = lm.n_layers

    def timed(label: str, fn, runner: Runner, enc) -> None:
        fn(runner, enc)  # warm-up
        t = time.perf_counter()
        fn(runner, enc)
        el = time.perf_counter() - t
        print(f"{label:<58} {enc.n_tokens / el:8.1f} prompt tok/s  ({len(enc)} prompts, {enc.n_tokens} tokens, "
              f"{el:.1f} s)")

    for share in (True, False):
        r = Runner(lm, fmt, batch_size=args.batch_size, progress=False, share_prefix=share)
        enc = r.encode(prompts)
        tag = "shared prefix" if share else "full prompts"
        timed(f"collect resid_pre, all {L} layers x {fmt.n_post} positions [{tag}]",
              lambda rr, e: rr.collect(e, list(range(L)), ["resid_pre"], fmt.post_positions(), reduce="sum"), r, enc)
        timed(f"collect resid_pre, layer {L // 2} (stops early) [{tag}]",
              lambda rr, e: rr.collect(e, [L // 2], ["resid_pre"], [-1], reduce="sum"), r, enc)
        timed(f"last-position logits [{tag}]", lambda rr, e: rr.logits(e), r, enc)

    # steering passes: activation addition at the post-instruction positions of layer L/2, score only
    from toolkit.interventions import activation_addition

    r = Runner(lm, fmt, batch_size=args.batch_size, progress=False)
    enc = r.encode(prompts)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    post = fmt.post_positions()

    def steered(rr, e, ctx=None):
        with activation_addition(lm.model, v, [L // 2], alpha=1.0, positions=post):
            return rr.logits(e, context=ctx)

    t = time.perf_counter()
    ctx = r.context(enc, len(post), start_layer=L // 2)
    el = time.perf_counter() - t
    print(f"{'context cache (once per prompt set)':<58} {el:8.1f} s")
    for label, c in (("full prompt", None), (f"context cache, last {len(post)} tokens from layer {L // 2}", ctx)):
        steered(r, enc, c)  # warm-up
        t = time.perf_counter()
        steered(r, enc, c)
        el = time.perf_counter() - t
        print(f"{'steered score pass [' + label + ']':<58} {el:8.2f} s  ({len(enc)} prompts, "
              f"{len(enc) / el:.1f} prompts/s)")

    if not args.no_demo:
        t = time.perf_counter()
        res = subprocess.run(["just", "demo_name=bench", "demo"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        el = time.perf_counter() - t
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            sys.exit(f"just demo failed with exit code {res.returncode}")
        print(f"just demo (score -> extract -> ablate -> compare), warm cache: {el / 60:.1f} min")


if __name__ == "__main__":
    main()
