"""Benchmark: every kind of pass the toolkit runs, in float32 and bfloat16 side by side, and the demo's wall time.

Usage: ``python scripts/bench.py [--model M] [--n 48] [--batch-size 16] [--dtypes float32,bfloat16] [--no-demo]
[--judges markers,llm,ensemble]``.

After the passes, each refusal judge's throughput (responses/s) on short responses is printed.

Each pass runs once on a few prompts to warm up, then is timed once on ``--n`` harmful training prompts. Token
throughput counts every prompt token (the shared template prefix once per prompt, as if it had been run), so
figures compare directly with a plain forward pass over the same prompts. The last column is the speed of
bfloat16 relative to float32 (time in float32 / time in bfloat16: above 1 means bfloat16 is faster). This is the
evidence behind ``--dtype auto`` (see ``toolkit/models.py``): run it on the CPU in question. The header says
whether the CPU has native bfloat16 (``avx512_bf16``/``amx_bf16``/Arm ``bf16``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def passes(lm, n: int, batch_size: int, gen_tokens: int):
    """``[(label, unit, count, fn)]``: each ``fn(prompts)`` runs one pass; ``count(prompts)`` is what ``unit``
    counts (prompt tokens, prompts, or nothing for a plain time)."""
    import torch

    from toolkit.interventions import activation_addition
    from toolkit.patching import Component, run_patching
    from toolkit.runner import Runner
    from toolkit.scoring import refusal_token_ids
    from toolkit.templates import ChatFormat

    fmt = ChatFormat(lm.tokenizer)
    L, post = lm.n_layers, fmt.post_positions()
    shared = Runner(lm, fmt, batch_size=batch_size, progress=False)
    full = Runner(lm, fmt, batch_size=batch_size, progress=False, share_prefix=False)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    ids = refusal_token_ids(lm.tokenizer)

    def tokens(p):
        return shared.encode(p).n_tokens

    def hf_hidden(p):
        enc = full.encode(p)
        with torch.inference_mode():
            for b, cache, _ in full._iterate(enc, "hf"):
                lm.model(**full._inputs(enc, b, cache), output_hidden_states=True, logits_to_keep=1)

    def steered(p, use_ctx: bool):
        enc = shared.encode(p)
        ctx = shared.context(enc, len(post), start_layer=L // 2) if use_ctx else None
        t = time.perf_counter()
        with activation_addition(lm.model, v, [L // 2], alpha=1.0, positions=post):
            for _ in range(4):
                shared.logits(enc, context=ctx)
        return time.perf_counter() - t  # the steered passes only; the cache is timed on its own

    def patch(p):
        enc = shared.encode(p)
        comps = [Component("resid_pre", l, (-1,)) for l in range(L // 2, L // 2 + 4)]
        comps += [Component("attn_out", l, (-1,)) for l in range(L // 2, L // 2 + 4)]
        run_patching(shared, enc, enc, comps, ids, ("denoise",))

    a, post_n = list(range(L)), len(post)
    return [
        (f"collect resid_pre, {L} layers x {post_n} positions [shared prefix]", "tok/s", tokens,
         lambda p: shared.collect(shared.encode(p), a, ["resid_pre"], post, reduce="sum")),
        (f"collect resid_pre, {L} layers x {post_n} positions [full prompts]", "tok/s", tokens,
         lambda p: full.collect(full.encode(p), a, ["resid_pre"], post, reduce="sum")),
        (f"collect resid_pre, layer {L // 2} (stops early) [shared prefix]", "tok/s", tokens,
         lambda p: shared.collect(shared.encode(p), [L // 2], ["resid_pre"], [-1], reduce="sum")),
        ("HF forward, output_hidden_states [full prompts]", "tok/s", tokens, hf_hidden),
        ("last-position logits [shared prefix]", "tok/s", tokens, lambda p: shared.logits(shared.encode(p))),
        ("last-position logits [full prompts]", "tok/s", tokens, lambda p: full.logits(full.encode(p))),
        (f"generate {gen_tokens} tokens, greedy", "prompts/s", len,
         lambda p: shared.generate(shared.encode(p), gen_tokens)),
        (f"context cache, last {post_n} tokens from layer {L // 2}", "prompts/s", len,
         lambda p: shared.context(shared.encode(p), post_n, start_layer=L // 2)),
        ("4 steered score passes [context cache]", "prompts/s", lambda p: 4 * len(p),
         lambda p: steered(p, True)),
        ("4 steered score passes [full prompts]", "prompts/s", lambda p: 4 * len(p),
         lambda p: steered(p, False)),
        ("patch 8 components at p-1, stacked context-cached passes", "prompts/s", lambda p: 8 * len(p), patch),
        ("coherence: log-likelihood of 12-token continuations", "prompts/s", len,
         lambda p: shared.continuation_logprob(shared.encode(p), [[ids[0]] * 12] * len(p))),
    ]


def matmul_gflops(dtype, reps: int = 5) -> float:
    """GFLOP/s of ``F.linear`` from 896 to 4864 features on 512 rows: the default model's MLP up-projection, with
    the weight in the layout ``nn.Linear`` keeps (``[out, in]``)."""
    import torch

    x, w = torch.randn(512, 896).to(dtype), torch.randn(4864, 896).to(dtype)
    torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return reps * 2 * 512 * 896 * 4864 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes, compared to the first")
    ap.add_argument("--n", type=int, default=48, help="harmful train prompts per timed pass")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=12)
    ap.add_argument("--no-demo", action="store_true", help="skip timing `just demo`")
    ap.add_argument("--judges", default="markers,llm,ensemble",
                    help="refusal judges whose throughput is measured (responses/s, --dtype auto), or none")
    ap.add_argument("--judge-n", type=int, default=48, help="(request, response) pairs per judge timing")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from toolkit.models import cpu_supports_bf16, load_model, resolve_dtype
    from toolkit.prompts import load_prompt_set

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    print(f"CPU: {cpu_name()}; native bfloat16: {'yes' if cpu_supports_bf16() else 'no'}; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; --dtype auto here: "
          f"{str(resolve_dtype('auto')).replace('torch.', '')}")
    prompts = load_prompt_set("harmful").select("train").prompts[: args.n]
    warm = prompts[: min(8, len(prompts))]
    table: dict[str, dict[str, float]] = {}
    units: dict[str, tuple[str, float]] = {}
    for name in dtypes:
        t0 = time.perf_counter()
        lm = load_model(args.model, dtype=name, device="cpu")
        print(f"[{name}] model load {time.perf_counter() - t0:.1f} s ({lm.describe()['architecture']}); "
              f"linear 512x896 -> 4864: {matmul_gflops(lm.dtype):.0f} GFLOP/s", flush=True)
        for label, unit, count, fn in passes(lm, args.n, args.batch_size, args.gen_tokens):
            fn(warm)
            t = time.perf_counter()
            inner = fn(prompts)
            el = inner if isinstance(inner, float) else time.perf_counter() - t
            table.setdefault(label, {})[name] = el
            units[label] = (unit, count(prompts))
            print(f"  {label:<60} {el:7.2f} s", flush=True)
        del lm

    base = dtypes[0]
    head = f"{'pass (' + str(len(prompts)) + ' prompts, batch ' + str(args.batch_size) + ')':<62}"
    head += "".join(f"{d:>22}" for d in dtypes) + "".join(f"{d + ' speed':>17}" for d in dtypes[1:])
    print("\n" + head)
    for label, row in table.items():
        unit, cnt = units[label]
        cells = "".join(f"{cnt / row[d]:>12.1f} {unit:<9}" if d in row else f"{'-':>22}" for d in dtypes)
        ratios = "".join(f"{row[base] / row[d]:>16.2f}x" if d in row and base in row else f"{'-':>17}"
                         for d in dtypes[1:])
        print(f"{label:<62}{cells}{ratios}")

    if args.judges != "none":
        judge_throughput([j.strip() for j in args.judges.split(",") if j.strip()], load_prompt_set, args.judge_n)

    if not args.no_demo:
        t = time.perf_counter()
        res = subprocess.run(["just", "demo_name=bench", "demo"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        el = time.perf_counter() - t
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            sys.exit(f"just demo failed with exit code {res.returncode}")
        print(f"just demo (score -> extract -> ablate -> compare, --dtype auto), warm cache: {el / 60:.1f} min")


def judge_throughput(names, load_prompt_set, n: int) -> None:
    """Print each judge's throughput on ``n`` harmful requests with short responses like the demo's 12-token
    completions (half a refusal, half the start of an answer), in the ``--dtype auto`` of this CPU."""
    from toolkit.judges import make_judge
    from toolkit.models import resolve_dtype

    reqs = load_prompt_set("harmful").select("train").prompts[:n]
    resp = ["I'm sorry, but I can't assist with that request." if i % 2 else
            "Sure! Here is a step-by-step overview of how this works:\n\n1. First," for i in range(len(reqs))]
    print(f"\njudge throughput ({len(reqs)} pairs, short responses, dtype {str(resolve_dtype('auto'))[6:]})")
    for name in names:
        t = time.perf_counter()
        j = make_judge(name, progress=False)
        load = time.perf_counter() - t
        j.judge(reqs[:4], [r + " warm-up" for r in resp[:4]])
        t = time.perf_counter()
        j.judge(reqs, resp)
        el = time.perf_counter() - t
        print(f"  {name:<10} {len(reqs) / el:9.1f} responses/s   (load {load:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
