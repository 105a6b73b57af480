"""Offline engine benchmark: N random requests submitted at once, against static batches of generate.

Prompt and output lengths are uniform in the given ranges (a fixed seed), prompts are random
token ids, and no request stops early (no stop ids, EOS ignored), so both sides produce the same
tokens. The baseline runs the same requests in order through `jllm.generate` in static batches
(each batch runs until its longest request is done; only the requested tokens count), in the
same process, after one untimed run of each of its shapes.
"""
import dataclasses
import os
import time

import numpy as np

from jllm.engine.api import SamplingParams
from jllm.engine.engine import Engine
from jllm.generate import DECODE_CHUNK, Model, bucket, generate
from jllm.runtime import write_atomic


@dataclasses.dataclass
class EngineBenchResult:
    n_requests: int
    prompt_lens: list[int]
    output_lens: list[int]
    startup_s: float                 # Engine(...) including compiling every step shape
    elapsed_s: float                 # first add_request to the last output
    output_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float        # prompt and output tokens
    ttft_s: dict[str, float]         # p50 / p90 / p99 over requests, from submission
    tpot_s: dict[str, float]         # time per output token after the first
    peak_pages: int
    pages_total: int
    preemptions: int
    steps: int
    prefix_hit_tokens: int
    timeline: list[tuple[float, int, int]]   # (seconds since submission, running requests, tokens out) per step
    baseline_batch: int
    baseline_elapsed_s: float | None
    baseline_output_tokens_per_s: float | None
    speedup: float | None            # engine output tokens/s over the baseline's


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)}


def _check_range(name: str, r) -> tuple[int, int]:
    if (not isinstance(r, (tuple, list)) or len(r) != 2 or not all(isinstance(x, int) for x in r)
            or not 1 <= r[0] <= r[1]):
        raise ValueError(f"{name}={r!r}; expected (low, high) ints with 1 <= low <= high")
    return int(r[0]), int(r[1])


def make_requests(n: int, vocab: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  seed: int) -> tuple[list[list[int]], list[int]]:
    """n random prompts (ids in [3, vocab)) and output lengths, lengths uniform in the ranges."""
    rng = np.random.default_rng(seed)
    plens = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    olens = rng.integers(output_len[0], output_len[1] + 1, n)
    prompts = [rng.integers(3, vocab, int(k)).tolist() for k in plens]
    return prompts, [int(k) for k in olens]


def run_engine(engine: Engine, prompts: list[list[int]], output_lens: list[int]) -> dict:
    """Submit everything at once and step to the end -> timings per request and per step."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, stop_token_ids=()))
           for p, n in zip(prompts, output_lens)]
    index = {rid: i for i, rid in enumerate(ids)}
    first, last, count = [None] * len(ids), [None] * len(ids), [0] * len(ids)
    timeline, peak = [], 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        produced = 0
        for o in outs:
            i = index[o.request_id]
            if o.token_ids:
                produced += len(o.token_ids)
                count[i] += len(o.token_ids)
                first[i] = now if first[i] is None else first[i]
                last[i] = now
        s = engine.stats()
        peak = max(peak, s.pages_used)
        timeline.append((now - t0, s.running, produced))
    elapsed = time.perf_counter() - t0
    ttft = [f - t0 for f in first if f is not None]
    tpot = [(lt - f) / (c - 1) for f, lt, c in zip(first, last, count) if c > 1]
    return dict(elapsed=elapsed, ttft=ttft, tpot=tpot, count=count, timeline=timeline, peak=peak)


def run_baseline(model: Model, prompts: list[list[int]], output_lens: list[int], batch: int) -> float:
    """Seconds for generate over static batches in order (each of its shapes run once untimed first)."""
    batches = [(prompts[i:i + batch], max(output_lens[i:i + batch])) for i in range(0, len(prompts), batch)]

    def shape(b):
        ps, new = b
        T = bucket(max(map(len, ps)), buckets=model.prompt_buckets)
        return bucket(len(ps), minimum=1), T, min(bucket(T + new + DECODE_CHUNK), model.cfg.max_seq_len)

    seen = set()
    for b in batches:
        if shape(b) not in seen:
            seen.add(shape(b))
            generate(model, b[0], max_new_tokens=b[1], stop_token_ids=[])
    t0 = time.perf_counter()
    for ps, new in batches:
        generate(model, ps, max_new_tokens=new, stop_token_ids=[])
    return time.perf_counter() - t0


def plot_timeline(timeline: list[tuple[float, int, int]], path: str) -> None:
    """Running requests and output tokens/s over time, as an image at `path` in the format its
    extension names (PNG without one; written, then renamed; missing directories are made)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = np.array([x[0] for x in timeline])
    running = np.array([x[1] for x in timeline])
    tokens = np.array([x[2] for x in timeline], float)
    # tokens/s over windows of about 2% of the run (at least one step)
    window = max(t[-1] / 50, 1e-9) if len(t) else 1.0
    edges = np.arange(0, (t[-1] if len(t) else 0) + window, window)
    counts, _ = np.histogram(t, bins=edges, weights=tokens)
    fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    a.step(t, running, where="post")
    a.set_ylabel("running requests")
    b.plot((edges[:-1] + edges[1:]) / 2, counts / window)
    b.set_ylabel("output tokens/s")
    b.set_xlabel("seconds since submission")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or "png"))
    finally:
        plt.close(fig)


def run_engine_bench(model: Model, n_requests: int = 1000, prompt_len: tuple[int, int] = (64, 1024),
                     output_len: tuple[int, int] = (64, 512), seed: int = 0, baseline: bool = True,
                     baseline_batch: int = 64, plot: str | None = None, engine_kwargs: dict | None = None,
                     ) -> EngineBenchResult:
    """The offline benchmark (module docstring). engine_kwargs go to Engine; plot: a PNG path."""
    if not isinstance(n_requests, int) or n_requests < 1:
        raise ValueError(f"{n_requests=}; expected an int >= 1")
    if not isinstance(baseline_batch, int) or baseline_batch < 1:
        raise ValueError(f"{baseline_batch=}; expected an int >= 1")
    prompt_len, output_len = _check_range("prompt_len", prompt_len), _check_range("output_len", output_len)
    if prompt_len[1] + output_len[1] > model.cfg.max_seq_len:
        raise ValueError(f"{prompt_len=} and {output_len=} reach {prompt_len[1] + output_len[1]} tokens, over "
                         f"the model's context of {model.cfg.max_seq_len}")
    prompts, olens = make_requests(n_requests, model.cfg.vocab_size, prompt_len, output_len, seed)
    t0 = time.perf_counter()
    engine = Engine(model, **(engine_kwargs or {}))
    startup = time.perf_counter() - t0
    run = run_engine(engine, prompts, olens)
    if run["count"] != olens:
        raise RuntimeError("the engine produced other token counts than requested")
    stats = engine.stats()
    del engine  # its pages go before the baseline allocates its caches
    out_tokens, in_tokens = sum(olens), sum(map(len, prompts))
    base_s = run_baseline(model, prompts, olens, baseline_batch) if baseline else None
    tps = out_tokens / run["elapsed"]
    base_tps = out_tokens / base_s if base_s else None
    if plot:
        plot_timeline(run["timeline"], plot)
    return EngineBenchResult(
        n_requests=n_requests, prompt_lens=[len(p) for p in prompts], output_lens=olens, startup_s=startup,
        elapsed_s=run["elapsed"], output_tokens=out_tokens, prompt_tokens=in_tokens, output_tokens_per_s=tps,
        total_tokens_per_s=(out_tokens + in_tokens) / run["elapsed"], ttft_s=_percentiles(run["ttft"]),
        tpot_s=_percentiles(run["tpot"]), peak_pages=run["peak"], pages_total=stats.pages_total,
        preemptions=stats.preemptions, steps=stats.steps, prefix_hit_tokens=stats.prefix_hit_tokens,
        timeline=run["timeline"], baseline_batch=baseline_batch, baseline_elapsed_s=base_s,
        baseline_output_tokens_per_s=base_tps, speedup=tps / base_tps if base_tps else None)


def format_result(r: EngineBenchResult) -> str:
    """A short table of the figures."""
    def ms(d):
        return " / ".join(f"{d[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))

    rows = [
        ("requests", f"{r.n_requests} (prompt {min(r.prompt_lens)}-{max(r.prompt_lens)}, "
                     f"output {min(r.output_lens)}-{max(r.output_lens)} tokens)"),
        ("engine start-up", f"{r.startup_s:.1f} s"),
        ("elapsed", f"{r.elapsed_s:.2f} s in {r.steps} steps ({r.preemptions} preemptions)"),
        ("output tok/s", f"{r.output_tokens_per_s:,.0f}"),
        ("total tok/s", f"{r.total_tokens_per_s:,.0f}"),
        ("TTFT p50/p90/p99", f"{ms(r.ttft_s)} ms"),
        ("TPOT p50/p90/p99", f"{ms(r.tpot_s)} ms"),
        ("peak pages", f"{r.peak_pages} of {r.pages_total}"),
    ]
    if r.baseline_output_tokens_per_s is not None:
        rows += [(f"generate, batches of {r.baseline_batch}",
                  f"{r.baseline_output_tokens_per_s:,.0f} output tok/s ({r.baseline_elapsed_s:.2f} s)"),
                 ("engine / generate", f"{r.speedup:.2f}x")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = ["EngineBenchResult", "format_result", "make_requests", "plot_timeline", "run_engine_bench"]
