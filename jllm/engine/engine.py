"""Engine: continuous batching over a paged KV cache (docs/ENGINE.md).

One thread owns an Engine: `add_request` queues work, each `step()` is one device call that
advances every running request, and returns what each request produced. With
async_scheduling (the default) step n+1 is dispatched before step n's tokens are read back, so
the host's scheduling and detokenizing overlap the device's work; step() then returns the
outputs of the step before the one it dispatched.

Over 400 lines: the public API, start-up compilation, the dispatch/read-back pipeline and
request bookkeeping share the engine's state; the scheduler and the device step are apart.
"""
import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import time
import warnings
from collections.abc import Sequence

import jax
import numpy as np

from jllm.engine.api import (MAX_LOGIT_BIAS, EngineStats, QueueFull, RequestMetrics, RequestOutput, SamplingParams,
                             seed_int32)
from jllm.engine.pages import PagePool
from jllm.engine.scheduler import Request, Schedule, Scheduler, Status, build_batch, default_shapes
from jllm.engine.step import (GUIDED_ROWS, TABLE_WRITES, StepOutput, engine_step, init_state, reset_keys,
                              reset_penalties, set_bias_rows, set_table_entries)
from jllm.generate import Model, check_kv_cache_dtype
from jllm.guided import follow, guide_tokenizer
from jllm.sampling import logprob_entries
from jllm.speculative import PromptLookup, Speculative
from jllm.streaming import Row

GUIDED_SYNC_SHARE = 0.5   # guided requests' share of the running ones from which steps run one at a time

DEFAULT_PAGES = 512  # without device memory statistics (CPU) and no num_pages


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose tokens are not read back yet."""
    out: StepOutput
    owners: list[Request | None]       # the request of each sample row
    logprobs: bool
    spec_rows: dict[int, int]          # sample row -> chunk row, for rows verifying drafts
    plp_pieces: list[tuple[Request, int, int, int]]  # (request, first position, tokens, offset in the chunk part)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}; expected an int >= {minimum}")
    return int(value)


def _buckets(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    b = tuple(value)
    if not b or any(not isinstance(x, int) or x < 1 for x in b) or list(b) != sorted(set(b)):
        raise ValueError(f"{name}={value!r}; expected increasing positive ints")
    return b


def page_bytes(model: Model, page_size: int, dtype) -> int:
    """Bytes one page takes on each device: keys and values of every layer (int8 pages add a
    float32 scale per token and KV head); KV heads split over the mesh unless replicated."""
    cfg, plan = model.cfg, model.plan
    heads = cfg.n_kv_heads if plan.kv_replicated else cfg.n_kv_heads // plan.tp
    dtype = np.dtype(dtype)
    per_token = heads * cfg.head_dim * dtype.itemsize + (heads * 4 if dtype == np.int8 else 0)
    return 2 * cfg.n_layers * page_size * per_token


def pages_from_memory(model: Model, page_size: int, dtype, memory_fraction: float) -> int | None:
    """Pages that fit in memory_fraction of the memory free on the first device (None if the
    device reports no memory statistics, as on CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * memory_fraction
    return int(free // page_bytes(model, page_size, dtype))


def default_compile_workers() -> int:
    """Start-up compile threads: 8 (at most the CPU count) on a GPU; 1 elsewhere, where the
    programs compile in seconds and each thread's compiler holds its own memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus) if jax.default_backend() == "gpu" else 1


class Engine:
    """Continuous batching over the paged KV cache (module docstring; docs/ENGINE.md).

    max_seqs decode slots, a pool of num_pages pages of page_size tokens (default: what fits in
    memory_fraction of the free device memory), max_tokens_per_step tokens per step (decodes
    first, prompt chunks fill the rest). Every step shape is compiled here, none later.
    Keyword-only tuning: chunk_row (queries per prompt-chunk row), decode_buckets and
    chunk_buckets (the compiled step shapes), max_prompts_per_step, async_scheduling, and
    max_model_len (prompt + output tokens of one request; default the model's max_seq_len: a
    smaller one shrinks the block tables, which the XLA attention path gathers whole).
    prompt_logprobs=True lets requests ask for SamplingParams.prompt_logprobs: each chunk shape
    then also compiles a variant that computes the logits after every chunk token (run only in
    steps holding such a prompt; its prompt is computed whole, without prefix-cache hits).

    speculative=Speculative(PromptLookup(n), k): each decode (greedy or sampled, no logprobs)
    whose context has an n-gram match verifies up to k drafted tokens as one chunk row and takes
    every accepted token at once, exactly the tokens it would decode one by one (a sampled row
    samples each position with the key plain decoding would use: the exact rejection rule for
    one-hot drafts). The engine then runs synchronously (drafting needs the last token on the
    host): for low-concurrency serving.

    compile_workers > 1 compiles the step programs that many at a time in threads (XLA compiles
    with the GIL released) before running each once on the executable jit keeps for it; None: 8
    (at most the CPU count) on a GPU, 1 elsewhere. 8 halved an H100's start-up (Llama-3.2-1B shape,
    19 programs: 122 -> 60 s; docs/PERFORMANCE.md, fifteenth round). If the threaded compile fails
    (say, device memory for several autotuners at once), a warning says so and the programs compile
    one at a time. The threads run under the engine's mesh but not under other thread-local jax
    settings of the caller (`jax.default_device`, `jax.default_matmul_precision`): under those,
    pass compile_workers=1, or each program compiles twice.
    """

    def __init__(self, model: Model, max_seqs: int = 64, page_size: int = 16, num_pages: int | None = None,
                 memory_fraction: float = 0.9, max_tokens_per_step: int = 512,
                 kv_cache_dtype: str | None = None, prefix_caching: bool = True,
                 max_queue: int | None = None, progress: bool = True, *, chunk_row: int | None = None,
                 decode_buckets: Sequence[int] | None = None, chunk_buckets: Sequence[int] | None = None,
                 max_prompts_per_step: int = 4, async_scheduling: bool = True,
                 max_model_len: int | None = None, speculative: Speculative | None = None,
                 prompt_logprobs: bool = False, compile_workers: int | None = None):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a jllm.Model (jllm.load); got {type(model).__name__}")
        self.model, self.cfg, self.plan = model, model.cfg, model.plan
        self.max_seqs = _positive_int("max_seqs", max_seqs)
        self.page_size = _positive_int("page_size", page_size)
        self.budget = _positive_int("max_tokens_per_step", max_tokens_per_step)
        if self.budget < self.max_seqs:
            raise ValueError(f"max_tokens_per_step={max_tokens_per_step} must be >= max_seqs={max_seqs} "
                             "(every running request decodes one token per step)")
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)) \
                or not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction={memory_fraction!r}; expected a number in (0, 1]")
        check_kv_cache_dtype(kv_cache_dtype)
        if max_queue is not None:
            _positive_int("max_queue", max_queue)
        self.max_queue = max_queue
        if chunk_row is not None and _positive_int("chunk_row", chunk_row) > self.budget:
            raise ValueError(f"chunk_row={chunk_row} must be <= max_tokens_per_step={max_tokens_per_step}")
        _positive_int("max_prompts_per_step", max_prompts_per_step)
        self.compile_workers = (default_compile_workers() if compile_workers is None
                                else _positive_int("compile_workers", compile_workers))
        decode_buckets, chunk_buckets = _buckets("decode_buckets", decode_buckets), _buckets("chunk_buckets", chunk_buckets)
        if decode_buckets is not None and decode_buckets[-1] < self.max_seqs:
            raise ValueError(f"decode_buckets={decode_buckets} must reach max_seqs={max_seqs}")
        self.shapes = default_shapes(self.max_seqs, self.budget, chunk_row, max_prompts_per_step,
                                     decode_buckets, chunk_buckets)
        self.spec_k, self.max_ngram = self._speculative(speculative, model)
        self.async_scheduling = bool(async_scheduling) and not self.spec_k
        self.prompt_logprobs = bool(prompt_logprobs)
        self.dtype = model.cache_dtype if kv_cache_dtype is None else np.dtype(kv_cache_dtype)
        if num_pages is None:
            num_pages = pages_from_memory(model, self.page_size, self.dtype, memory_fraction) or DEFAULT_PAGES
            if num_pages < 1:
                raise ValueError(f"no device memory left for KV pages ({memory_fraction=}); pass num_pages")
        self.num_pages = _positive_int("num_pages", num_pages)
        self.max_len = self.cfg.max_seq_len if max_model_len is None else _positive_int("max_model_len", max_model_len)
        if self.max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_model_len={max_model_len} is over the model's max_seq_len={self.cfg.max_seq_len}")
        # Tables as wide as one request can grow (`context`): with a 128K-context model's default
        # max_len a smaller pool (CPU's DEFAULT_PAGES) would give 8192-page tables, which the XLA
        # attention path gathers whole, per row and step.
        self.max_pages = -(-self.context // self.page_size)
        self.pool = PagePool(self.num_pages, prefix_caching)
        self.scheduler = Scheduler(self.pool, self.page_size, self.max_seqs, self.max_pages, self.budget,
                                   self.shapes, self.spec_k, self.max_ngram)
        self.requests: dict[str, Request] = {}
        self._outputs: list[RequestOutput] = []   # final outputs of aborted requests, for the next step
        self._inflight: _InFlight | None = None
        self._ids = itertools.count()
        self.generated_tokens = self.aborted = self.steps = 0
        self._biased_slots: set[int] = set()   # slots whose logit bias is not zero
        self._guided: set[Request] = set()      # guided requests not finished (step(): how they run)
        with self._on_mesh():
            self.state = init_state(self.cfg, self.num_pages, self.page_size, self.max_seqs, self.dtype,
                                    model.mesh, self.max_pages)
            self._compile(progress)

    def _speculative(self, spec, model: Model) -> tuple[int, int]:
        """(k, max_ngram) of a prompt-lookup Speculative, (0, 0) for None."""
        if spec is None:
            return 0, 0
        if not isinstance(spec, Speculative):
            raise TypeError(f"speculative must be a jllm.speculative.Speculative or None; got {type(spec).__name__}")
        if not isinstance(spec.proposer, PromptLookup):
            raise ValueError(f"speculative.proposer={type(spec.proposer).__name__}; the engine takes only "
                             "PromptLookup (drafting on the host)")
        spec.proposer.check(model)
        if spec.k + 1 > self.shapes.chunk_row:
            raise ValueError(f"speculative.k={spec.k}: k + 1 must be <= chunk_row={self.shapes.chunk_row} "
                             "(the drafts are verified in one chunk row)")
        return spec.k, spec.proposer.max_ngram

    def _on_mesh(self):
        if self.model.mesh is None:
            return contextlib.nullcontext()
        from jllm import parallel
        return parallel.mesh_context(self.model.mesh)

    def _compile(self, progress: bool) -> None:
        """Run every step program once on a batch that changes nothing, so none compiles later:
        each shape, and for pure decode shapes (C = 0) also the greedy variant (`_greedy`) and the
        sampled one without cuts (`_filtered`). With compile_workers > 1 they are first compiled
        in threads (jit's `lower(...).compile()` leaves the executable its own calls then use)."""
        from tqdm import tqdm
        programs = ([(D, C, False, False, True) for D, C in self.shapes.all()]
                    + [(D, 0, True, False, True) for D in self.shapes.decode_buckets]
                    + [(D, 0, False, False, False) for D in self.shapes.decode_buckets]
                    + [(D, C, False, True, True) for D, C in self.shapes.all() if C and self.prompt_logprobs])
        ahead = self.compile_workers > 1
        with tqdm(total=len(programs) * (1 + ahead) + 3, desc="compiling engine steps", unit="program",
                  disable=not progress, leave=False) as bar:
            if ahead:
                def compile_one(program):
                    with self._on_mesh():  # the mesh context is per thread
                        self._step_program(*program, compile_only=True)
                    bar.update()

                try:
                    with concurrent.futures.ThreadPoolExecutor(self.compile_workers) as pool:
                        list(pool.map(compile_one, programs))  # re-raises the first failure
                except Exception as e:  # e.g. device memory for 8 autotuners at once: go on one at a time
                    warnings.warn(f"compiling the engine's step programs {self.compile_workers} at a time failed "
                                  f"({type(e).__name__}: {str(e)[:200]}); compiling the rest one at a time "
                                  "(compile_workers=1 skips the attempt)", RuntimeWarning, stacklevel=3)
            for program in programs:
                self.state = self._step_program(*program)
                bar.update()
            none = np.zeros(self.max_seqs, np.int32)
            for resume in (False, True):
                keys = reset_keys(self.state.keys, none.astype(bool), none, none, resume=resume)
                self.state = dataclasses.replace(self.state, keys=keys)
                bar.update()
            self._reset_penalties(none.astype(bool), [])
            self._set_bias_rows([])
            self._write_tables(compile_only=True)
            bar.update()
            jax.block_until_ready(self.state)

    def _step_program(self, D: int, C: int, greedy: bool, plp: bool, filtered: bool, compile_only: bool = False):
        """One step program over a batch that changes nothing: run (-> the new state) or only
        compiled."""
        batch, _ = build_batch(Schedule([], [], []), self.shapes, self.scheduler.tables, self.num_pages,
                               self.max_seqs, self.page_size, dims=(D, C), spec_k=self.spec_k)
        kw = dict(cfg=self.cfg, plan=self.plan, greedy=greedy, prompt_logprobs=plp, filtered=filtered)
        if compile_only:
            return engine_step.lower(self.model.params, self.state, batch, **kw).compile()
        return engine_step(self.model.params, self.state, batch, **kw)[0]

    # --- requests ------------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is an empty string")
            if self.model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as a list of token ids")
            return self.model.tokenizer.encode(prompt, bos=True)
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"prompt must be a str or a list of int token ids; got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is an empty token list")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
        return [int(t) for t in prompt]

    @property
    def context(self) -> int:
        """The most tokens one request can hold, prompt and output: max_model_len, or the whole
        pool where that is smaller."""
        return min(self.max_len, self.num_pages * self.page_size)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request -> its id. Raises ValueError/TypeError for bad input, QueueFull when
        max_queue requests wait already."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams; got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        n, m = len(ids), params.max_tokens
        if n + m > self.max_len:
            raise ValueError(f"the prompt has {n} tokens; with max_tokens={m} that needs {n + m} positions, "
                             f"over the engine's context of {self.max_len} (max_model_len)")
        if -(-(n + m) // self.page_size) > self.num_pages:
            raise ValueError(f"the prompt has {n} tokens; with max_tokens={m} it needs "
                             f"{-(-(n + m) // self.page_size)} pages of {self.page_size} tokens, more than the "
                             f"pool's num_pages={self.num_pages}")
        if any(t >= self.cfg.vocab_size for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias has token ids outside [0, {self.cfg.vocab_size}): "
                             f"{[t for t, _ in params.logit_bias if t >= self.cfg.vocab_size][:5]}")
        if params.prompt_logprobs is not None and not self.prompt_logprobs:
            raise ValueError(f"prompt_logprobs={params.prompt_logprobs} needs an Engine made with "
                             "prompt_logprobs=True (it compiles the steps that compute them)")
        if params.stop and self.model.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs a tokenizer; this model has none (use stop_token_ids)")
        matcher = None if params.guided is None else self._matcher(params.guided)
        if request_id is None:
            request_id = next(r for r in (f"req-{i}" for i in self._ids) if r not in self.requests)
        elif not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id={request_id!r}; expected a non-empty str or None")
        elif request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already running or waiting")
        elif any(o.request_id == request_id for o in self._outputs):
            raise ValueError(f"request_id={request_id!r} was aborted and its final output is not out yet: "
                             f"step() first, or take another id")
        if self.max_queue is not None and len(self.scheduler.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests wait already (max_queue={self.max_queue})")
        stop_ids = params.stop_token_ids
        if stop_ids is None or matcher is not None:
            # A grammar allows EOS only once the output is complete: there it ends the output,
            # whatever stop_token_ids says (it is never part of a guided output).
            stop_ids = tuple(stop_ids or ()) + (() if self.model.tokenizer is None else self.model.tokenizer.stop_ids)
        row = Row(0, ids, self.model.tokenizer, list(params.stop), set(stop_ids), m)
        req = Request(request_id, ids, params, row, time.perf_counter())
        req.matcher = matcher
        self.requests[request_id] = req
        if matcher is not None:
            self._guided.add(req)
        self.scheduler.add(req)
        return request_id

    def prepare_guided(self) -> bool:
        """Build the tokenizer view guided requests need now rather than at the first one (a
        server calls this at start-up) -> whether guided decoding is available (a tokenizer and
        llguidance)."""
        if self.model.tokenizer is None:
            return False
        try:
            guide_tokenizer(self.model.tokenizer, self.cfg.vocab_size)
        except ValueError:   # no llguidance
            return False
        return True

    def _matcher(self, guided):
        """A fresh grammar matcher for a guided request (ValueError for a bad grammar, or without
        a tokenizer or llguidance)."""
        if self.model.tokenizer is None:
            raise ValueError(f"guided={guided.kind} needs a tokenizer; this model has none")
        return guide_tokenizer(self.model.tokenizer, self.cfg.vocab_size).matcher(guided)

    def add_requests(self, requests: Sequence[tuple]) -> list[str]:
        """Queue (prompt, params, request_id) requests at once, all or none -> their ids: QueueFull
        when max_queue cannot take them all, and what add_request raises for any of them."""
        if self.max_queue is not None and len(self.scheduler.waiting) + len(requests) > self.max_queue:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests wait already; {len(requests)} more would "
                            f"pass max_queue={self.max_queue}")
        ids: list[str] = []
        try:
            for prompt, params, request_id in requests:
                ids.append(self.add_request(prompt, params, request_id))
        except BaseException:
            for rid in ids:  # never scheduled (no step ran): gone without an output
                self._drop(self.requests[rid])
            raise
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request now: its slot and pages are free at once, and its final output
        (finish_reason "abort") comes out of the next step(). Unknown or finished ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return
        self._drop(req)
        self.aborted += 1
        self._outputs.append(self._output(req, None, [], None, "abort", time.perf_counter()))

    def _drop(self, req: Request) -> None:
        """A finished or aborted request leaves: its slot and pages free, its id forgotten."""
        self.scheduler.finish(req)
        del self.requests[req.id]
        self._guided.discard(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests or self._outputs or self._inflight)

    # --- stepping ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One device call advancing every running request -> an output for every request that
        produced something or finished (aborted ones too)."""
        outs, self._outputs = self._outputs, []
        # A guided request's next mask needs its last token. While guided requests are at least
        # GUIDED_SYNC_SHARE of the running ones, steps run one at a time; below it the others
        # keep one step in flight and a guided request sits out the step after each of its
        # samples (the scheduler skips it while its sample is on the device): it decodes every
        # other step, and nobody waits for the host. Its admission step needs no token.
        guided = sum(r.status is Status.RUNNING for r in self._guided)
        sync = not self.async_scheduling or (guided and guided >= GUIDED_SYNC_SHARE * len(self.scheduler.running))
        if self._inflight is not None and (sync or self.scheduler.decode_pages_short()):
            outs += self._read(self._inflight)  # preemption needs every sample on the host
            self._inflight = None
        launched = self._launch()
        if self._inflight is not None:
            outs += self._read(self._inflight)
        self._inflight = launched
        if sync and launched is not None:
            outs += self._read(launched)
            self._inflight = None
        return outs

    def _launch(self) -> _InFlight | None:
        sched = self.scheduler.schedule()
        if not sched:
            return None
        now = time.perf_counter()
        if sched.admitted:
            mask, seeds, skips = np.zeros(self.max_seqs, bool), np.zeros(self.max_seqs, np.int32), \
                np.zeros(self.max_seqs, np.int32)
            for r in sched.admitted:
                mask[r.slot], seeds[r.slot], skips[r.slot] = True, seed_int32(r.params.seed), r.key_skip
                if r.t_scheduled is None:
                    r.t_scheduled = now
            with self._on_mesh():
                keys = reset_keys(self.state.keys, mask, seeds, skips, resume=bool(skips.any()))
                # Penalty state is read with neutral coefficients for others, except a logit bias
                # left in a slot: cleared too.
                reset = [r for r in sched.admitted if r.penalized or r.slot in self._biased_slots]
                if reset:
                    mask_reset = np.zeros(self.max_seqs, bool)
                    mask_reset[[r.slot for r in reset]] = True
                    self._reset_penalties(mask_reset, [r for r in reset if r.penalized])
            self.state = dataclasses.replace(self.state, keys=keys)
        batch, owners = build_batch(sched, self.shapes, self.scheduler.tables, self.num_pages, self.max_seqs,
                                    self.page_size, spec_k=self.spec_k)
        logprobs = any(r is not None and r.want_logprobs for r in owners)
        guided = [r for r in owners if r is not None and r.matcher is not None]
        if guided:
            with self._on_mesh():
                self._set_bias_rows(guided)
        with self._on_mesh():
            self._write_tables()
        plp_pieces, cpos = [], 0   # chunk pieces lie in schedule order in the chunk part (build_batch)
        for p in sched.chunks:
            if p.req.needs_prompt_lp and p.drafts is None:
                plp_pieces.append((p.req, p.start, p.n, cpos))
            cpos += p.n
        greedy = self._greedy(batch, owners, logprobs)
        with self._on_mesh():   # (filtered means nothing to the greedy program: one variant)
            self.state, out = engine_step(self.model.params, self.state, batch, cfg=self.cfg, plan=self.plan,
                                          greedy=greedy, prompt_logprobs=bool(plp_pieces),
                                          filtered=greedy or self._filtered(batch, owners))
        self.steps += 1
        D = len(owners) - len(batch.spec_m)
        spec_rows = {D + r: r for r in np.nonzero(batch.spec_m)[0].tolist()}
        return _InFlight(out, owners, logprobs, spec_rows, plp_pieces)

    def _reset_penalties(self, mask: np.ndarray, requests: list[Request]) -> None:
        """Clear the penalty state of the masked slots and set the requests' logit biases (at
        most max_prompts_per_step requests are admitted in a step: a static number of entries)."""
        n = MAX_LOGIT_BIAS * self.shapes.max_prompts
        slot, ids, values = np.full(n, self.max_seqs, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32)
        i = 0
        self._biased_slots -= set(np.nonzero(mask)[0].tolist())
        for r in requests:
            for t, b in r.params.logit_bias:
                slot[i], ids[i], values[i] = r.slot, t, b
                i += 1
            if r.params.logit_bias:
                self._biased_slots.add(r.slot)
        s = self.state
        counts, seen, bias = reset_penalties(s.counts, s.prompt_seen, s.bias, mask, slot, ids, values)
        self.state = dataclasses.replace(s, counts=counts, prompt_seen=seen, bias=bias)

    def _write_tables(self, compile_only: bool = False) -> None:
        """Copy the block-table entries the scheduler wrote since the last step to the device's
        tables (EngineState.tables), TABLE_WRITES per call, the last write of each entry kept (a
        scatter applies duplicates in no set order); compile_only: one call that writes nothing."""
        writes, self.scheduler.table_writes = self.scheduler.table_writes, []
        if not writes and not compile_only:
            return
        M = self.max_pages
        key = np.concatenate([s * M + c + np.arange(len(p)) for s, c, p in writes] or [np.zeros(0, np.int64)])
        page = np.concatenate([np.asarray(p, np.int32) for _, _, p in writes] or [np.zeros(0, np.int32)])
        last = len(key) - 1 - np.unique(key[::-1], return_index=True)[1]   # each entry's last write
        key, page = key[last], page[last]
        for first in range(0, max(len(key), 1), TABLE_WRITES):
            slot = np.full(TABLE_WRITES, self.max_seqs, np.int32)
            col, pages = np.zeros(TABLE_WRITES, np.int32), np.zeros(TABLE_WRITES, np.int32)
            part = slice(first, first + TABLE_WRITES)
            n = len(key[part])
            slot[:n], col[:n], pages[:n] = key[part] // M, key[part] % M, page[part]
            self.state = dataclasses.replace(self.state, tables=set_table_entries(self.state.tables, slot, col, pages))

    def _set_bias_rows(self, requests: list[Request]) -> None:
        """Set each guided request's slot bias for its next sample: its logit_bias where its
        grammar allows a token, -inf elsewhere (GUIDED_ROWS slots per device call)."""
        W, E = -(-self.cfg.vocab_size // 32), GUIDED_ROWS * MAX_LOGIT_BIAS
        for first in range(0, max(len(requests), 1), GUIDED_ROWS):
            part = requests[first:first + GUIDED_ROWS]
            slots, words = np.full(GUIDED_ROWS, self.max_seqs, np.int32), np.zeros((GUIDED_ROWS, W), np.uint32)
            entry_row, entry_id = np.full(E, GUIDED_ROWS, np.int32), np.zeros(E, np.int32)
            entry_value, n = np.zeros(E, np.float32), 0
            for j, r in enumerate(part):
                slots[j], words[j] = r.slot, r.matcher.words()
                for t, b in r.params.logit_bias:
                    entry_row[n], entry_id[n], entry_value[n], n = j, t, b, n + 1
                self._biased_slots.add(r.slot)
            self.state = dataclasses.replace(self.state, bias=set_bias_rows(
                self.state.bias, slots, words, entry_row, entry_id, entry_value))

    @staticmethod
    def _greedy(batch, owners, logprobs: bool) -> bool:
        """A pure decode step (no prompt chunk) whose rows are all greedy without logprobs or
        penalties runs the greedy program: no sort over the vocabulary (steady state of greedy
        serving)."""
        return batch.tok_row.shape[0] == 0 and not logprobs and all(
            r is None or r.temperature == 0 and not r.penalized for r in owners)

    @staticmethod
    def _filtered(batch, owners) -> bool:
        """False for a pure decode step none of whose rows cuts its distribution (top-k, top-p,
        min-p): its sampled rows draw from the tempered logits and no sort over the vocabulary
        is traced (OpenAI's default sampling: temperature alone)."""
        return batch.tok_row.shape[0] > 0 or any(
            r is not None and (r.top_k > 0 or r.top_p < 1 or r.min_p > 0) for r in owners)

    def _read(self, step: _InFlight) -> list[RequestOutput]:
        """Read a step's samples back and hand them to their requests."""
        tokens = np.asarray(step.out.tokens).tolist()
        if step.logprobs:
            lp, top_ids, top_lp = (np.asarray(x) for x in (step.out.logprob, step.out.top_ids, step.out.top_logprobs))
        if step.spec_rows:
            spec_out, spec_n = np.asarray(step.out.spec_out), np.asarray(step.out.spec_n)
        if step.plp_pieces:
            self._prompt_logprobs(step)
        now = time.perf_counter()
        outs = []
        for i, req in enumerate(step.owners):
            if req is None:
                continue
            req.pending -= 1
            if req.status is not Status.RUNNING:  # aborted (or finished) while this step ran
                continue
            new = [tokens[i]]
            if i in step.spec_rows:  # [last, d1..dm] verified: n accepted drafts and the token after
                r = step.spec_rows[i]
                m, n = req.computed - len(req.tokens), int(spec_n[r])
                new = spec_out[r, :n + 1].tolist()
                req.computed -= m - n  # the rejected drafts' keys are stale: overwritten later
                self.scheduler.drafted_tokens += m
                self.scheduler.accepted_tokens += n
            tok = new[-1]
            req.tokens += new
            self.generated_tokens += len(new)
            if req.t_first is None:
                req.t_first = now
            req.t_last = now
            delta = req.row.push(new, now)
            if req.matcher is not None:
                delta = follow(req.row, req.matcher, new, now, delta)
            logprobs = None
            finish = req.row.finish
            # A stop token is not among the output's ids, but its logprob is (as OpenAI reports it).
            if req.want_logprobs and (delta is not None and delta.token_ids or finish == "stop"
                                      and tok in req.row.stop_ids):
                n = req.params.logprobs
                logprobs = logprob_entries([tok], lp[i:i + 1], top_ids[i:i + 1], top_lp[i:i + 1], n)
            if finish is not None:
                self._drop(req)
            if delta is not None or finish is not None:
                out = self._output(req, delta, delta.token_ids if delta else [], logprobs, finish, now)
                if req.needs_prompt_lp:  # its prompt is done: with the first output
                    out.prompt_logprobs, req.prompt_lp_sent = list(req.prompt_lp), True
                outs.append(out)
        return outs

    @staticmethod
    def _prompt_logprobs(step: _InFlight) -> None:
        """Keep each prompt token's log-probability (and the top ones) from a step's chunks."""
        lp, top_ids, top_lp = (np.asarray(x) for x in (step.out.plp_logprob, step.out.plp_top_ids,
                                                        step.out.plp_top_logprobs))
        for req, start, n, cpos in step.plp_pieces:
            if req.status is not Status.RUNNING or not req.needs_prompt_lp:
                continue
            k = req.params.prompt_logprobs
            for j in range(n):
                pos = start + j + 1   # the token this chunk token's logits predict
                if pos < len(req.prompt):
                    c = cpos + j
                    [req.prompt_lp[pos]] = logprob_entries([req.prompt[pos]], lp[c:c + 1], top_ids[c:c + 1],
                                                           top_lp[c:c + 1], k)

    def _output(self, req: Request, delta, token_ids: list[int], logprobs, finish: str | None,
                now: float) -> RequestOutput:
        metrics = None
        if finish is not None:
            first = req.t_first if req.t_first is not None else now
            n = len(req.row.tokens)
            rate = (n - 1) / (req.t_last - first) if n > 1 and req.t_last > first else 0.0
            metrics = RequestMetrics(
                queue_s=(req.t_scheduled if req.t_scheduled is not None else now) - req.t_arrival,
                ttft_s=first - req.t_arrival, decode_tokens_per_s=rate,
                cached_prompt_tokens=req.cached_tokens or 0, preemptions=req.preemptions)
        return RequestOutput(req.id, delta.text if delta else "", list(token_ids), finish is not None, finish,
                             len(req.prompt), len(req.row.tokens), logprobs, metrics)

    # --- conveniences ----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(running=len(s.running), waiting=len(s.waiting), pages_used=self.pool.used,
                           pages_total=self.num_pages, pages_cached=len(self.pool.lru),
                           prefix_hit_tokens=s.prefix_hit_tokens, prompt_tokens=s.prompt_tokens,
                           prefill_tokens=s.prefill_tokens, generated_tokens=self.generated_tokens,
                           aborted=self.aborted, preemptions=s.preemptions, steps=self.steps,
                           drafted_tokens=s.drafted_tokens, accepted_tokens=s.accepted_tokens)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion on an idle engine -> final outputs in order, text and ids whole."""
        if self.has_unfinished():
            raise RuntimeError("Engine.generate needs an idle engine; step() the running requests first")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of str or of token-id lists; got {prompts!r}")
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        ids = self.add_requests([(p, sp, None) for p, sp in zip(prompts, params)])
        acc = {rid: RequestOutput(rid, "", [], False, None, 0, 0, None) for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                a = acc[o.request_id]
                a.text += o.text
                a.token_ids += o.token_ids
                if o.logprobs is not None:
                    a.logprobs = (a.logprobs or []) + o.logprobs
                if o.prompt_logprobs is not None:
                    a.prompt_logprobs = o.prompt_logprobs
                a.finished, a.finish_reason, a.metrics = o.finished, o.finish_reason, o.metrics
                a.prompt_tokens, a.completion_tokens = o.prompt_tokens, o.completion_tokens
        return [acc[rid] for rid in ids]

