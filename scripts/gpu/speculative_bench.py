"""Speculative decoding with quantized self-drafts on random weights: measured speed-up and the cost model.

For a target model (bf16 Llama-2-7B shape on the GPU; the tiny config on CPU in the tests) it measures
plain decode tokens/s, then for each self-draft (int8, int4) and k: acceptance, tokens/s and the
speed-up over plain decode in the same run. The cost model times the jitted steps themselves: the
target's verify step over k+1 positions against a 1-token decode step, and each draft's k-token
proposal; it predicts the speed-up at acceptance a as

    tokens per round (1 - a^(k+1)) / (1 - a)  x  t_plain / (t_draft(k) + t_verify(k))

where t_draft(k) is the draft's whole proposal of k tokens (k steps) and t_plain plain decode's
time per token in the same run (1 / its tokens/s: the measured speed-up's own denominator; plain
`generate` runs many steps per device call, so it is ~7% below one jitted 1-token step, t_target,
which the verify step is compared with). The first factor assumes each draft is accepted
independently; on random weights agreement comes in runs, so each run also gets the time model
alone, at its measured tokens per round ("predicted at tok/step": tokens per round x t_plain /
(t_draft(k) + t_verify(k))).

    PYTHONPATH=. python3 -m scripts.gpu speculative --config llama-2-7b --plot spec.png --json spec.json
    PYTHONPATH=. python3 -m scripts.gpu speculative --config llama-3.1-8b --drafts int4 --draft-configs llama-3.2-1b

--draft-configs adds drafts that are other models of the same vocabulary (Llama-3.2-1B for
Llama-3.1-8B). Their random weights agree with the target's by chance only, so what they give is
the cost model: the draft's step time and the speed-up it predicts at acceptances 0.5-0.9.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jllm import speculative as sp
from jllm.config import LlamaConfig
from jllm import generate
from jllm.generate import Model, decode, prefill
from jllm.kvcache import init_cache
from jllm.model import init_params
from jllm.sampling import Sampling

ACCEPTANCE_GRID = tuple(np.round(np.arange(0.5, 0.901, 0.05), 2).tolist())


def expected_tokens(a: float, k: int) -> float:
    """Tokens per round at per-draft acceptance a: (1 - a^(k+1)) / (1 - a)."""
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def predicted_speedup(a: float, k: int, t_plain: float, t_draft_k: float, t_verify: float) -> float:
    """The cost model's speed-up over plain decode at acceptance a (t_plain: plain decode's time
    per token; t_draft_k: all k draft steps)."""
    return expected_tokens(a, k) * t_plain / (t_draft_k + t_verify)


def _timed(fn, state, repeats: int) -> tuple[float, object]:
    """Seconds per call of state = fn(state), calls queued back to back after one warm-up, and the
    last state (fn donates its buffers: the caller goes on with the returned state)."""
    state = jax.block_until_ready(fn(state))
    t = time.perf_counter()
    for _ in range(repeats):
        state = fn(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / repeats, state


def step_times(model: Model, drafts: dict[str, Model], ks, prompt_len: int, repeats: int) -> dict:
    """Seconds of the jitted steps at batch 1 over a cache holding prompt_len tokens: 'target' (one
    decode step), 'verify' {k: verify over k+1 positions}, 'draft' {name: {k: k-token proposal}},
    'draft_step' {name: one decode step of the draft}."""
    B, S = 1, prompt_len + 2 * max(ks) + 8
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, model.cfg.vocab_size, (B, prompt_len)), jnp.int32)
    n_tokens = jnp.full((B,), prompt_len, jnp.int32)
    greedy = Sampling.make(B)

    def filled(m: Model):
        cache = init_cache(m.cfg, B, S, m.cache_dtype)
        token, cache, key = prefill(m.params, tokens, n_tokens, cache, greedy, jax.random.key(0),
                                    cfg=m.cfg, plan=m.plan)
        return token, cache, key

    def decode_time(m: Model) -> float:
        token, cache, key = filled(m)
        start = np.asarray(cache.lengths)  # host copy: the step donates the cache's own array

        def one(state):  # the cache length is put back each call: every step sees the same context
            cache, key = state
            _, cache, key = decode(m.params, token, cache, greedy, key, cfg=m.cfg, n_steps=1, plan=m.plan)
            return dataclasses.replace(cache, lengths=jnp.asarray(start)), key
        return _timed(one, (cache, key), repeats)[0]

    out = {"target": decode_time(model), "verify": {}, "draft": {}, "draft_step": {}}
    token, cache, key = filled(model)
    state = cache, key
    inactive = jnp.zeros((B,), bool)  # verify then leaves the cache length where it was
    for k in ks:
        drafts_k = jnp.asarray(rng.integers(3, model.cfg.vocab_size, (B, k)), jnp.int32)
        m = jnp.full((B,), k, jnp.int32)

        def check(state, drafts_k=drafts_k, m=m):
            cache, key = state
            _, _, _, cache, key = sp.verify(model.params, token, drafts_k, m, None, inactive, cache, greedy,
                                            key, cfg=model.cfg, plan=model.plan)
            return cache, key
        out["verify"][k], state = _timed(check, state, repeats)
    for name, d in drafts.items():
        out["draft_step"][name] = decode_time(d)
        out["draft"][name] = {}
        dtoken, dcache, dkey = filled(d)
        dstart, dstate = np.asarray(dcache.lengths), (dcache, dkey)
        head = jnp.stack([dtoken, jnp.zeros_like(dtoken)], axis=1)
        n_head = jnp.ones((B,), jnp.int32)
        for k in ks:
            def propose(state, k=k):
                dcache, dkey = state
                _, _, dcache, dkey = sp.draft_tokens(d.params, head, n_head, dcache, greedy, dkey,
                                                     cfg=d.cfg, plan=d.plan, k=k)
                return dataclasses.replace(dcache, lengths=jnp.asarray(dstart)), dkey
            out["draft"][name][k], dstate = _timed(propose, dstate, repeats)
    return out


def measure(model: Model, drafts: dict[str, Model], ks=(2, 4, 6), prompt_len: int = 128,
            new_tokens: int = 128, repeats: int = 3, step_repeats: int = 20, seed: int = 0) -> dict:
    """Plain and speculative greedy decode of one random prompt (batch 1), and the cost model."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, model.cfg.vocab_size, prompt_len).tolist()

    def best(**kw):  # the fastest of `repeats` runs after one warm-up (compiles)
        runs = [generate(model, [prompt], max_new_tokens=new_tokens, stop_token_ids=[], **kw)[0]
                for _ in range(repeats + 1)]
        return max(runs[1:], key=lambda r: r.stats.decode_tokens_per_s)

    plain = best()
    print(f"plain decode {plain.stats.decode_tokens_per_s:.1f} tok/s", flush=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "prompt_len": prompt_len,
              "new_tokens": new_tokens, "plain_tok_s": plain.stats.decode_tokens_per_s, "runs": []}
    for name, d in drafts.items():
        proposer = sp.DraftModel(d)
        for k in ks:
            r = best(speculative=sp.Speculative(proposer, k))
            result["runs"].append(dict(
                draft=name, k=k, acceptance=r.stats.acceptance, tokens_per_step=r.stats.tokens_per_step,
                tok_s=r.stats.decode_tokens_per_s, speedup=r.stats.decode_tokens_per_s / result["plain_tok_s"],
                same_tokens=r.tokens == plain.tokens,
                same_prefix=next((i for i, (a, b) in enumerate(zip(r.tokens, plain.tokens)) if a != b),
                                 min(len(r.tokens), len(plain.tokens)))))
            print(f"{name} k={k}: " + ", ".join(f"{key} {val:.3f}" if isinstance(val, float) else f"{key} {val}"
                                             for key, val in result["runs"][-1].items()), flush=True)
    t = step_times(model, drafts, ks, prompt_len, step_repeats)
    result["t_target_ms"] = 1e3 * t["target"]
    result["t_plain_ms"] = 1e3 / result["plain_tok_s"]
    result["t_verify_ms"] = {k: 1e3 * v for k, v in t["verify"].items()}
    result["t_draft_step_ms"] = {n: 1e3 * v for n, v in t["draft_step"].items()}
    result["t_draft_ms"] = {n: {k: 1e3 * v for k, v in d.items()} for n, d in t["draft"].items()}
    for run in result["runs"]:
        k, name = run["k"], run["draft"]
        args = (k, result["t_plain_ms"] / 1e3, t["draft"][name][k], t["verify"][k])
        run["t_draft_ms"], run["t_verify_ms"] = 1e3 * args[2], 1e3 * args[3]
        run["predicted"] = predicted_speedup(run["acceptance"], *args)
        run["predicted_at_tokens"] = run["tokens_per_step"] * args[1] / (args[2] + args[3])
        run["curve"] = [predicted_speedup(a, *args) for a in ACCEPTANCE_GRID]
    return result


def format_table(result: dict) -> str:
    """The cost model's step times and each run's measured and predicted speed-up."""
    lines = [f"plain decode {result['plain_tok_s']:.1f} tok/s ({result['t_plain_ms']:.3f} ms per token); "
             f"one target step {result['t_target_ms']:.3f} ms",
             "verify k+1 vs 1-token step: " + ", ".join(
                 f"k={k} {v:.3f} ms ({v / result['t_target_ms']:.2f}x)" for k, v in result["t_verify_ms"].items()),
             "draft step: " + ", ".join(f"{n} {v:.3f} ms ({v / result['t_target_ms']:.2f}x)"
                                        for n, v in result["t_draft_step_ms"].items()),
             f"{'draft':<6} {'k':>2} {'accept':>7} {'tok/step':>8} {'tok/s':>8} {'speed-up':>8} "
             f"{'predicted':>9} {'at tok/step':>11} {'same':>5}  predicted at a = "
             + " ".join(f"{a:.2f}" for a in ACCEPTANCE_GRID[::2])]
    for r in result["runs"]:
        lines.append(f"{r['draft']:<6} {r['k']:>2} {100 * r['acceptance']:>6.1f}% {r['tokens_per_step']:>8.2f} "
                     f"{r['tok_s']:>8.1f} {r['speedup']:>7.2f}x {r['predicted']:>8.2f}x "
                     f"{r['predicted_at_tokens']:>10.2f}x {str(r['same_tokens']):>5}  "
                     + " ".join(f"{s:.2f}" for s in r["curve"][::2]))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Predicted speed-up against acceptance, one curve per (draft, k), with the measured points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    low = min([0.5] + [r["acceptance"] for r in result["runs"]])
    grid = np.linspace(low, 1.0, 60)
    for i, r in enumerate(result["runs"]):
        color = f"C{i % 10}"
        curve = [predicted_speedup(a, r["k"], result["t_plain_ms"], r["t_draft_ms"], r["t_verify_ms"]) for a in grid]
        ax.plot(grid, curve, "-", color=color, label=f"{r['draft']} k={r['k']}")
        ax.plot([r["acceptance"]], [r["speedup"]], "o", color=color)
        ax.plot([r["acceptance"]], [r["predicted"]], "x", color=color)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("acceptance rate a (o measured, x predicted at the measured a)")
    ax.set_ylabel("speed-up over plain decode")
    ax.set_title(f"speculative decoding, self-drafts, {result['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}"  # renamed when complete: no half-written image
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(result: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu speculative", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--drafts", nargs="*", default=["int8", "int4"], choices=["int8", "int4"])
    ap.add_argument("--draft-configs", nargs="*", default=[], metavar="NAME",
                    help="other named configs of the same vocabulary as drafts (random weights: the cost model)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn-impl", default=None)
    ap.add_argument("--matmul-impl", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    cfg = LlamaConfig.from_name(args.config)
    print(f"random {args.config} weights ({args.dtype}) on {jax.devices()[0].device_kind}", file=sys.stderr)
    from jllm import plan
    model = Model(params=init_params(cfg, jax.random.key(0), jnp.dtype(args.dtype)), cfg=cfg,
                  attn_impl=args.attn_impl or plan.default_attn_impl(),
                  matmul_impl=args.matmul_impl or plan.default_matmul_impl())
    drafts = {q: sp.self_draft(model, q).model for q in args.drafts}
    for name in args.draft_configs:
        dcfg = LlamaConfig.from_name(name)
        if dcfg.vocab_size != cfg.vocab_size:
            sys.exit(f"--draft-configs {name}: vocab_size {dcfg.vocab_size} differs from {args.config}'s {cfg.vocab_size}")
        drafts[name] = dataclasses.replace(model, params=init_params(dcfg, jax.random.key(1), jnp.dtype(args.dtype)),
                                           cfg=dcfg)
    result = measure(model, drafts, tuple(args.ks), args.prompt_len, args.new_tokens, args.repeats)
    if args.json:
        _write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    print(format_table(result))

