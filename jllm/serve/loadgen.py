"""`jllm bench serve`: load an OpenAI-compatible server and measure what its clients see.

Requests stream (SSE); the time of each chunk that carries text is recorded on arrival, so TTFT,
inter-token latency, TPOT and end-to-end latency are what a client experiences, HTTP included.
Arrivals are Poisson at each given request rate (open loop), or a fixed number of clients each
sending its next request when the last one ends (closed loop). Every run is bounded by a request
count and a wall-clock limit. Results: JSON (one entry per rate or concurrency) and a PNG of
latency against throughput.

    jllm bench serve --url http://127.0.0.1:8000 --model NAME --request-rate 1 2 4 inf

Over 400 lines: one self-contained client (load shapes, timing, report, plot, CLI) that may
run against any server.
"""
import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import string
import sys
import time

from jllm import argtypes
from jllm.runtime import write_atomic


PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    url: str                               # the server's base URL (with or without /v1)
    model: str
    endpoint: str = "completions"          # "completions" | "chat"
    prompts: str = "random-ids"            # "random-ids" | "random-words" | a file path
    num_prompts: int = 100                 # requests per run (per rate or concurrency)
    input_len: int = 512                   # random prompts: tokens (ids) or words
    output_len: int = 256                  # max_tokens of every request
    vocab_size: int = 32000                # random ids are drawn from [3, vocab_size)
    ignore_eos: bool = False               # vLLM's extension: always generate output_len tokens
    json_share: float = 0.0                # requests asking for JSON (response_format json_object), evenly spread
    max_duration_s: float = 600.0          # wall-clock limit of one run
    request_timeout_s: float = 600.0
    slo_ttft_s: float | None = None        # goodput counts requests meeting every given SLO
    slo_tpot_s: float | None = None
    slo_e2e_s: float | None = None
    seed: int = 0
    api_key: str | None = None

    def __post_init__(self):
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint={self.endpoint!r}; expected 'completions' or 'chat'")
        if self.prompts == "random-ids" and self.endpoint == "chat":
            raise ValueError("prompts='random-ids' needs endpoint='completions' (chat takes text)")
        if self.prompts not in ("random-ids", "random-words") and not os.path.isfile(self.prompts):
            raise ValueError(f"prompts={self.prompts!r} is not 'random-ids', 'random-words' or a file")
        for name in ("num_prompts", "input_len", "output_len", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 1")
        if self.vocab_size <= 3 and self.prompts == "random-ids":
            raise ValueError(f"vocab_size={self.vocab_size} leaves no ids to draw from [3, vocab_size)")
        if isinstance(self.json_share, bool) or not isinstance(self.json_share, (int, float)) \
                or not 0 <= self.json_share <= 1:
            raise ValueError(f"json_share={self.json_share!r} must be a number in [0, 1]")
        for name in ("max_duration_s", "request_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a finite number > 0")
        for name in ("slo_ttft_s", "slo_tpot_s", "slo_e2e_s"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a finite number > 0")


@dataclasses.dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)   # gaps between text chunks

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def make_prompts(cfg: LoadConfig) -> list:
    """num_prompts prompts: random token-id lists, random words, or a file's (cycled) prompts."""
    rng = random.Random(cfg.seed)
    if cfg.prompts == "random-ids":
        return [[rng.randrange(3, cfg.vocab_size) for _ in range(cfg.input_len)]
                for _ in range(cfg.num_prompts)]
    if cfg.prompts == "random-words":
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8)))
                 for _ in range(2000)]
        return [" ".join(rng.choices(words, k=cfg.input_len)) for _ in range(cfg.num_prompts)]
    found = read_prompts(cfg.prompts)
    return [found[i % len(found)] for i in range(cfg.num_prompts)]


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSON lines with a "prompt" (or "text") field, else one per line."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    prompts = []
    for i, line in enumerate(lines):
        if path.endswith(".jsonl"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1} is not JSON: {e}") from None
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text:
                raise ValueError(f"{path}:{i + 1} has no non-empty 'prompt' or 'text' string")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def _endpoint_url(base: str, endpoint: str) -> str:
    base = base.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/{'chat/completions' if endpoint == 'chat' else 'completions'}"


def asks_json(cfg: LoadConfig, i: int) -> bool:
    """Whether request i asks for JSON: json_share of them, evenly spread (every 4th at 0.25)."""
    return int((i + 1) * cfg.json_share) > int(i * cfg.json_share)


def _payload(cfg: LoadConfig, prompt, json_object: bool = False) -> dict:
    body = {"model": cfg.model, "max_tokens": cfg.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if json_object:
        body["response_format"] = {"type": "json_object"}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _has_output(obj: dict) -> bool:
    """Whether a chunk carries output: text, or token ids (jllm serving a model without a
    tokenizer)."""
    choices = obj.get("choices") or []
    if not choices:
        return False
    c = choices[0]
    return bool(c.get("text") or (c.get("delta") or {}).get("content") or c.get("token_ids"))


async def send(client, url: str, cfg: LoadConfig, prompt, json_object: bool = False) -> RequestResult:
    """One streamed request on an httpx.AsyncClient, timing each chunk that carries text (asking
    for a JSON object with json_object)."""
    import httpx  # the [serve] extra; imported where used, so `jllm --help` needs none of it
    result = RequestResult(ok=False)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    done, finish = False, None
    try:
        async with client.stream("POST", url, json=_payload(cfg, prompt, json_object)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if not isinstance(obj, dict):
                    result.error = f"a stream event that is not a JSON object: {data[:100]}"
                    return result
                if "error" in obj:
                    result.error = str(obj["error"])[:200]
                    return result
                for c in obj.get("choices") or []:
                    finish = c.get("finish_reason") or finish
                now = time.perf_counter()
                if _has_output(obj):
                    chunks += 1
                    if last is None:
                        result.ttft_s = now - t0
                    else:
                        result.itl_s.append(now - last)
                    last = now
                usage = obj.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = usage.get("completion_tokens", 0)
    except Exception as e:  # noqa: BLE001 (any failure is this request's, never the worker's end)
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    if not done:
        result.error = "the stream ended without data: [DONE]"
        return result
    if finish not in ("stop", "length"):  # "abort": the server cut it off (e.g. its shutdown)
        result.error = f"finish_reason {finish!r}"
        return result
    result.e2e_s = time.perf_counter() - t0
    result.output_tokens = result.output_tokens or chunks
    result.ok = True
    return result


async def _run_point(cfg: LoadConfig, prompts: list, rate: float, concurrency: int | None) -> tuple:
    """Send the prompts (Poisson at `rate`, or `concurrency` closed-loop clients) -> results."""
    import httpx
    url = _endpoint_url(cfg.url, cfg.endpoint)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    n_conn = concurrency or len(prompts)
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    rng = random.Random(cfg.seed + 1)
    results: list[RequestResult] = []
    start = time.perf_counter()
    deadline = start + cfg.max_duration_s
    async with httpx.AsyncClient(timeout=cfg.request_timeout_s, limits=limits, headers=headers) as client:
        async def one(i: int) -> None:
            results.append(await send(client, url, cfg, prompts[i], asks_json(cfg, i)))

        tasks = []
        if concurrency is not None:
            queue = list(reversed(range(len(prompts))))

            async def worker() -> None:
                while queue and time.perf_counter() < deadline:
                    await one(queue.pop())

            tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(prompts)))]
        else:
            for i in range(len(prompts)):
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.ensure_future(one(i)))
                if math.isfinite(rate) and i + 1 < len(prompts):  # no idle gap after the last one
                    await asyncio.sleep(min(rng.expovariate(rate), max(0.0, deadline - time.perf_counter())))
        pending = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
    duration = time.perf_counter() - start
    incomplete = len(prompts) - len(results)
    return results, duration, incomplete


def _stats(values: list[float]) -> dict:
    """mean and percentiles in milliseconds (None without values)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ordered = sorted(values)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": 1e3 * sum(ordered) / len(ordered), **{f"p{p}": 1e3 * pct(p) for p in PERCENTILES}}


def summarize(cfg: LoadConfig, results: list[RequestResult], duration: float, incomplete: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)

    def good(r: RequestResult) -> bool:
        checks = [(cfg.slo_ttft_s, r.ttft_s), (cfg.slo_tpot_s, r.tpot_s), (cfg.slo_e2e_s, r.e2e_s)]
        return all(limit is None or (value is not None and value <= limit) for limit, value in checks)

    slos = any(x is not None for x in (cfg.slo_ttft_s, cfg.slo_tpot_s, cfg.slo_e2e_s))
    n_good = sum(good(r) for r in ok) if slos else None
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "incomplete": incomplete,
        "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": _stats([g for r in ok for g in r.itl_s]),
        "e2e_ms": _stats([r.e2e_s for r in ok]),
        "goodput": None if n_good is None else n_good / duration,
        "slo_attainment": None if n_good is None or not ok else n_good / len(ok),
        "errors": errors[:10],
    }


def run(cfg: LoadConfig, request_rates: list[float] | None = None,
        concurrencies: list[int] | None = None, progress=None) -> dict:
    """One run per request rate (Poisson; inf: all at once) or per concurrency -> a report."""
    if bool(request_rates) == bool(concurrencies):
        raise ValueError("give request rates or concurrencies (one of the two)")
    if request_rates and any(not (r > 0) for r in request_rates):
        raise ValueError(f"request_rates={request_rates} must be > 0 (inf: all at once)")
    if concurrencies and any(not isinstance(c, int) or c < 1 for c in concurrencies):
        raise ValueError(f"concurrencies={concurrencies} must be ints >= 1")
    prompts = make_prompts(cfg)
    points = [("request_rate", r) for r in request_rates or []] + \
             [("concurrency", c) for c in concurrencies or []]
    runs = []
    for kind, value in points:
        rate, conc = (value, None) if kind == "request_rate" else (math.inf, value)
        results, duration, incomplete = asyncio.run(_run_point(cfg, prompts, rate, conc))
        summary = {kind: value if math.isfinite(value) else "inf",
                   **summarize(cfg, results, duration, incomplete)}
        runs.append(summary)
        if progress is not None:
            progress(format_row(summary))
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "api_key"}
    return {"config": config, "runs": runs}


def format_row(s: dict) -> str:
    key = "request_rate" if "request_rate" in s else "concurrency"

    def ms(d: dict, k: str) -> str:
        return "-" if d[k] is None else f"{d[k]:.1f}"

    return (f"{key}={s[key]}: {s['completed']} ok, {s['failed']} failed, {s['incomplete']} "
            f"incomplete in {s['duration_s']:.1f} s; {s['request_throughput']:.2f} req/s, "
            f"{s['output_token_throughput']:.1f} out tok/s; TTFT p50 {ms(s['ttft_ms'], 'p50')} "
            f"p99 {ms(s['ttft_ms'], 'p99')} ms; TPOT p50 {ms(s['tpot_ms'], 'p50')} ms; ITL p50 "
            f"{ms(s['itl_ms'], 'p50')} p99 {ms(s['itl_ms'], 'p99')} ms; E2E p50 "
            f"{ms(s['e2e_ms'], 'p50')} ms" + ("" if s["goodput"] is None else
                                              f"; goodput {s['goodput']:.2f} req/s"))


def write_json(report: dict, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)
    write_atomic(path, write)


def plot(report: dict, path: str) -> None:
    """PNG: TTFT, inter-token latency and end-to-end latency against output tokens/s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    x = [r["output_token_throughput"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric, title in zip(axes, ("ttft_ms", "itl_ms", "e2e_ms"),
                                 ("time to first token", "inter-token latency", "end-to-end latency")):
        for p, style in (("p50", "o-"), ("p99", "s--")):
            ys = [r[metric][p] for r in runs]
            ax.plot(x, [math.nan if y is None else y for y in ys], style, label=p)
        for xi, r in zip(x, runs):
            label = f"rate {r['request_rate']}" if "request_rate" in r else f"{r['concurrency']} clients"
            ax.annotate(label, (xi, r[metric]["p50"] or 0), fontsize=8,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['config']['model']}: latency against throughput")
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=110)
    write_atomic(path, write)
    plt.close(fig)


# --- command line (`jllm bench serve`) ---------------------------------------------------------

def _positive(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or (kind is int and value < 1):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", required=True, help="the model id the server serves")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--prompts", default="random-ids",
                   help="random-ids | random-words | a file (.jsonl with 'prompt', or one per line)")
    p.add_argument("--num-prompts", type=lambda t: _positive(int, t), default=100)
    p.add_argument("--input-len", type=lambda t: _positive(int, t), default=512)
    p.add_argument("--output-len", type=lambda t: _positive(int, t), default=256)
    p.add_argument("--vocab-size", type=lambda t: _positive(int, t), default=32000)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --output-len tokens")
    json_group = p.add_mutually_exclusive_group()
    json_group.add_argument("--json-mode", action="store_true",
                      help="every request asks for a JSON object (response_format json_object): the cost of "
                           "guided decoding (a reply ends when its object is complete)")
    json_group.add_argument("--json-share", type=argtypes.probability, default=0.0, metavar="F",
                      help="this share of the requests asks for a JSON object, evenly spread (0.25: every 4th)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--request-rate", type=lambda t: _positive(float, t), nargs="+",
                      help="Poisson request rates per second (inf: all at once)")
    mode.add_argument("--concurrency", type=lambda t: _positive(int, t), nargs="+",
                      help="closed-loop clients")
    p.add_argument("--max-duration", type=lambda t: _positive(float, t), default=600.0,
                   help="wall-clock limit of each run, seconds")
    p.add_argument("--request-timeout", type=lambda t: _positive(float, t), default=600.0)
    p.add_argument("--slo-ttft-ms", type=lambda t: _positive(float, t), default=None)
    p.add_argument("--slo-tpot-ms", type=lambda t: _positive(float, t), default=None)
    p.add_argument("--slo-e2e-ms", type=lambda t: _positive(float, t), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write a PNG of latency against throughput")


def run_cli(args) -> int:
    ms = lambda v: None if v is None else v / 1e3  # noqa: E731
    cfg = LoadConfig(url=args.url, model=args.model, endpoint=args.endpoint, prompts=args.prompts,
                     num_prompts=args.num_prompts, input_len=args.input_len,
                     output_len=args.output_len, vocab_size=args.vocab_size,
                     ignore_eos=args.ignore_eos, json_share=1.0 if args.json_mode else args.json_share, max_duration_s=args.max_duration,
                     request_timeout_s=args.request_timeout, slo_ttft_s=ms(args.slo_ttft_ms),
                     slo_tpot_s=ms(args.slo_tpot_ms), slo_e2e_s=ms(args.slo_e2e_ms), seed=args.seed,
                     api_key=os.environ.get("OPENAI_API_KEY"))
    if args.plot:
        import matplotlib  # noqa: F401  (fail before the run, not after)
    rates = args.request_rate or (None if args.concurrency else [math.inf])
    report = run(cfg, rates, args.concurrency,
                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report["runs"], indent=2))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
    return 0
