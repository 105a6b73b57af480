"""The engine's host side: request states, decode slots, pages, preemption, and each step's batch.

Every request holds its tokens (prompt, then the samples read back) and `computed`, how many of
them have their keys in the pool or in a dispatched step. A step schedules, within a token
budget: first one decode token for every running request whose prompt is done, then prompt
chunks of requests still prefilling, then new requests from the waiting queue (FIFO: the head
is never passed over, so nothing starves). Prompt chunks stop at a chunk bucket when filling the
budget would pad over a quarter of the next one (unless all waiting prompt tokens fit). A
request is admitted when a slot is free and the pool can take its whole prompt (minus the pages found in the prefix cache, plus a small
watermark while others run); decode pages are taken one at a time as a request grows. When a
decode finds no page, the newest running request is preempted: its pages go back to the pool
and it waits at the head of the queue, to be recomputed (prompt and samples so far, often from
the prefix cache) when pages free up. The oldest request is never preempted for a newer one, and
a lone request always fits (the engine checks that at add_request), so every request finishes.

Over 400 lines: the request state, the step's schedule and its batch arrays are one policy,
read together.
"""
import collections
import dataclasses
import enum
import itertools

import numpy as np

from jllm.engine.api import SamplingParams
from jllm.engine.pages import PagePool, block_hash
from jllm.engine.step import StepBatch
from jllm.sampling import top_k_code
from jllm.speculative import lookup
from jllm.streaming import Row


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One request's host state (module docstring)."""

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, row: Row, now: float):
        self.id, self.prompt, self.params, self.row = rid, prompt, params, row
        self.tokens = list(prompt)   # prompt + samples read back
        self.pending = 0             # samples dispatched but not read back
        self.computed = 0            # tokens whose keys are written by dispatched steps
        self.pages: list[int] = []
        self.keys: list[bytes] = []  # prefix-cache keys of the full pages of `tokens`
        self.registered = 0          # leading pages offered to the prefix cache
        self.slot: int | None = None
        self.sampled = False         # sampled in its current slot: the device holds its last token
        self.status = Status.WAITING
        self.preemptions = 0
        self.key_skip = 0            # samples before its current admission (its PRNG key resumes there:
                                     # one split per sampled token, verified drafts included)
        self.cached_tokens: int | None = None  # prefix-cache hit at its first admission
        self.t_arrival, self.t_scheduled, self.t_first, self.t_last = now, None, None, None
        p = params
        self.temperature = float(p.temperature)
        self.top_k = top_k_code(p.top_k)
        self.top_p = 1.0 if p.top_p is None else float(p.top_p)
        self.min_p = 0.0 if p.min_p is None else float(p.min_p)
        self.want_logprobs = p.logprobs is not None
        self.presence, self.frequency = float(p.presence_penalty), float(p.frequency_penalty)
        self.repetition = float(p.repetition_penalty)
        self.penalized = p.penalized
        # Prompt logprobs, filled as the prompt's chunks are read back: entry i for prompt token i.
        self.prompt_lp: list | None = None if p.prompt_logprobs is None else [None] * len(prompt)
        self.prompt_lp_sent = False
        self.matcher = None          # a jllm.guided.Matcher when the request is guided (set by the engine)

    @property
    def needs_prompt_lp(self) -> bool:
        """Asks for prompt logprobs not yet delivered: its prompt is computed, not cached."""
        return self.prompt_lp is not None and not self.prompt_lp_sent

    @property
    def total(self) -> int:
        """Tokens the request has, counting samples still on the device."""
        return len(self.tokens) + self.pending

    @property
    def n_sampled(self) -> int:
        return self.total - len(self.prompt)

    @property
    def exhausted(self) -> bool:
        """Its last allowed sample is dispatched: nothing more to schedule."""
        return self.n_sampled >= self.params.max_tokens

    def is_decode(self) -> bool:
        return self.sampled and self.total - self.computed == 1

    @property
    def prefilling(self) -> bool:
        """Prompt (or recomputed) tokens are left to compute before it decodes."""
        return self.computed < self.total and not self.is_decode()

    def block_keys(self, n: int, ps: int) -> list[bytes]:
        """Prefix-cache keys of the first n full pages of ps tokens (their tokens must be known)."""
        while len(self.keys) < n:
            i = len(self.keys)
            self.keys.append(block_hash(self.keys[-1] if i else None, self.tokens[i * ps:(i + 1) * ps]))
        return self.keys[:n]


@dataclasses.dataclass
class Piece:
    """Tokens [start, start + n) of a request computed in one step; `samples` if it ends them.
    A verifying piece (drafts set) is [last, d1..dm], n = m + 1, past the request's tokens."""
    req: Request
    start: int
    n: int
    samples: bool
    drafts: list[int] | None = None


@dataclasses.dataclass
class Schedule:
    decodes: list[Request]
    chunks: list[Piece]
    admitted: list[Request]      # given a slot this step (their PRNG keys are set first)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.chunks)


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The static shapes of the compiled steps: decode rows D, chunk tokens C, rows of chunk_row
    queries; the chunk part of C tokens has rows(C) rows (room for max_prompts partial rows)."""
    decode_buckets: tuple[int, ...]
    chunk_buckets: tuple[int, ...]
    chunk_row: int
    max_prompts: int

    def rows(self, C: int) -> int:
        return 0 if C == 0 else -(-C // self.chunk_row) + self.max_prompts - 1

    def all(self) -> list[tuple[int, int]]:
        return [(D, C) for D in self.decode_buckets for C in (0,) + self.chunk_buckets]

    @staticmethod
    def pick(n: int, buckets: tuple[int, ...]) -> int:
        return next(b for b in buckets if b >= n)


def default_shapes(max_seqs: int, budget: int, chunk_row: int | None, max_prompts: int,
                   decode_buckets=None, chunk_buckets=None) -> StepShapes:
    """Decode buckets max_seqs / 4^k (padding decode rows cost little: the step reads the weights
    once either way); chunk buckets chunk_row * 2^k up to the budget, and the room beside the
    largest decode bucket (budget - max_seqs, e.g. 768 of 1024 beside 256) when it is a multiple of
    chunk_row."""
    if decode_buckets is None:
        decode_buckets, d = [], max_seqs
        while True:
            decode_buckets.insert(0, d)
            if d <= 4:
                break
            d = max(1, d // 4)
    if chunk_row is None:
        chunk_row = min(128, budget)
    if chunk_buckets is None:
        chunk_buckets, c = [], chunk_row
        while c < budget:
            chunk_buckets.append(c)
            c *= 2
        chunk_buckets.append(budget)
        room = budget - decode_buckets[-1]  # the chunk room beside a full decode bucket
        if room > 0 and room % chunk_row == 0 and room not in chunk_buckets:
            chunk_buckets = sorted(chunk_buckets + [room])
    return StepShapes(tuple(decode_buckets), tuple(chunk_buckets), chunk_row, max_prompts)


class Scheduler:
    """Waiting queue, running requests, slots and pages (module docstring)."""

    def __init__(self, pool: PagePool, page_size: int, max_seqs: int, max_pages: int, budget: int,
                 shapes: StepShapes, spec_k: int = 0, max_ngram: int = 0):
        self.spec_k, self.max_ngram = spec_k, max_ngram     # prompt-lookup drafts per step (0: off)
        self.drafted_tokens = self.accepted_tokens = 0
        self.pool, self.page_size, self.max_seqs, self.max_pages = pool, page_size, max_seqs, max_pages
        self.budget, self.shapes = budget, shapes
        self.max_chunk = shapes.chunk_buckets[-1]
        self.watermark = max(1, pool.num_pages // 100)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []                  # in admission order, oldest first
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.tables = np.full((max_seqs, max_pages), -1, np.int32)  # block table of each slot
        # Entries of `tables` written since the engine last copied them to the device's tables
        # (EngineState.tables): (slot, first column, pages). A vacated slot is not cleared there:
        # what lies past a row's length is never read.
        self.table_writes: list[tuple[int, int, list[int]]] = []
        self.prompt_tokens = self.prefix_hit_tokens = self.prefill_tokens = self.preemptions = 0

    # --- request lifecycle -----------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def _take_pages(self, req: Request, n: int) -> None:
        new = self.pool.allocate(n)
        self.tables[req.slot, len(req.pages):len(req.pages) + n] = new
        self.table_writes.append((req.slot, len(req.pages), new))
        req.pages += new

    def register(self, req: Request) -> None:
        """Offer the request's full pages to the prefix cache: those written by dispatched steps,
        whose tokens the host knows. A later step reads them after the writing step (one device
        stream), and a step that writes them reads them only after writing (write, then attend,
        in every layer), so a request admitted in the same step may share them already."""
        if not self.pool.prefix_caching:
            return
        full = min(req.computed, len(req.tokens)) // self.page_size
        if full > req.registered:
            for page, key in zip(req.pages[req.registered:full], req.block_keys(full, self.page_size)[req.registered:]):
                self.pool.register(page, key)
            req.registered = full

    def _vacate(self, req: Request) -> None:
        """Give back the request's pages and slot."""
        self.pool.release(req.pages)
        self.tables[req.slot] = -1
        self.free_slots.append(req.slot)
        req.pages, req.slot, req.sampled, req.registered = [], None, False, 0
        self.running.remove(req)

    def finish(self, req: Request) -> None:
        """A finished or aborted request leaves at once: its pages and slot are free."""
        if req.status is Status.RUNNING:
            self.register(req)
            self._vacate(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED

    def preempt(self, req: Request) -> None:
        """Send a running request back to the head of the queue, to be recomputed."""
        if req.pending:
            raise RuntimeError(f"preempting request {req.id!r} with {req.pending} samples in flight")
        self.register(req)
        self._vacate(req)
        req.computed = 0
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    # --- scheduling ------------------------------------------------------------------------

    def _needs_page(self, req: Request) -> bool:
        return req.computed // self.page_size >= len(req.pages)

    def decode_pages_short(self) -> bool:
        """Would this step's decodes need more pages than the pool has (so someone is preempted)?"""
        need = sum(1 for r in self.running if r.is_decode() and not r.exhausted and self._needs_page(r))
        return need > self.pool.available()

    def schedule(self) -> Schedule:
        """Pick this step's work (module docstring) and reserve its pages."""
        budget = self.budget
        decodes, chunks, admitted = [], [], []
        preempted = False
        chunk_tokens, running = 0, list(self.running)
        # While a prompt waits or is being prefilled, drafts leave it one chunk row.
        draft_rows = self.shapes.max_prompts - (self.spec_k > 0 and self._prompt_tokens() > 0)
        for i, req in enumerate(running):
            if req.status is not Status.RUNNING or req.exhausted or not req.is_decode():
                continue
            if req.matcher is not None and req.pending:   # its mask needs the sample in flight
                continue
            drafts = self._drafts(req, budget - (len(running) - i - 1), self.max_chunk - chunk_tokens,
                                  draft_rows - len(chunks))
            if drafts:  # verify [last, d1..dm] as a chunk row
                n = len(drafts) + 1
                # Pages of rejected drafts stay reserved: a shorter verification may need none.
                self._take_pages(req, max(0, -(-(req.computed + n) // self.page_size) - len(req.pages)))
                chunks.append(Piece(req, req.computed, n, True, drafts))
                req.computed, req.pending, budget, chunk_tokens = req.computed + n, req.pending + 1, budget - n, chunk_tokens + n
                self.register(req)
                continue
            if self._needs_page(req):
                while self.pool.available() < 1:
                    victim = self.running[-1]  # the newest; not scheduled yet (or req itself)
                    self.preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.status is not Status.RUNNING:
                    continue
                self._take_pages(req, 1)
            decodes.append(req)
            req.computed += 1
            req.pending += 1
            self.register(req)
            budget -= 1

        # The step computes every row of its decode bucket, padding included, so the chunks get
        # what the budget leaves beside the whole bucket: 225 decodes in a 256 bucket and a 1024
        # budget take 768 prompt tokens (a 1024-token step), not 799 padded to 1024 (1280).
        pad = StepShapes.pick(max(len(decodes), 1), self.shapes.decode_buckets) - len(decodes)
        room = max(budget - pad, min(budget, self.shapes.chunk_row))
        chunk_cap = self._chunk_cap(chunk_tokens, room, self._prompt_tokens())

        def add_chunk(req: Request) -> None:
            nonlocal budget, chunk_tokens
            n = min(req.total - req.computed, budget, chunk_cap - chunk_tokens)
            piece = Piece(req, req.computed, n, req.computed + n == req.total)
            chunks.append(piece)
            req.computed += n
            if piece.samples:
                req.pending += 1
                req.sampled = True
            self.register(req)
            budget -= n
            chunk_tokens += n
            self.prefill_tokens += n

        def room() -> bool:
            return budget > 0 and chunk_tokens < chunk_cap and len(chunks) < self.shapes.max_prompts

        for req in list(self.running):
            if not room():
                break
            if req.prefilling:
                add_chunk(req)
        while self.waiting and not preempted and self.free_slots and room():
            req = self.waiting[0]
            if not self._admit(req):
                break
            admitted.append(req)
            add_chunk(req)
        return Schedule(decodes, chunks, admitted)

    def _prompt_tokens(self) -> int:
        """Prompt tokens a step's chunks could take at most: what the running requests still have
        to prefill, and the waiting requests that could be admitted."""
        return (sum(r.total - r.computed for r in self.running if r.prefilling)
                + sum(r.total for r in itertools.islice(self.waiting, self.shapes.max_prompts)))

    def _chunk_cap(self, taken: int, budget: int, pending: int | None = None) -> int:
        """Chunk tokens this step may hold, `taken` already in it: as many as the budget leaves,
        unless padding them to their chunk bucket would waste over a quarter of it; then the
        bucket below (the step's matmuls run over the padded rows, so padding is work for nothing).
        When every pending prompt token fits (`pending`: an upper bound), no cap: splitting them
        would only delay their first tokens by a step."""
        most = taken + min(budget, self.max_chunk - taken)
        if most == 0 or (pending is not None and taken + pending <= most):
            return most
        up = StepShapes.pick(most, self.shapes.chunk_buckets)
        down = max((b for b in self.shapes.chunk_buckets if b <= most), default=0)
        return down if 4 * (up - most) > up and down > taken else most

    def _drafts(self, req: Request, budget: int, chunk_room: int, rows_left: int) -> list[int]:
        """Prompt-lookup drafts for a decoding request (verified as a chunk row), or [] where it
        decodes plainly: speculation off, a row asking for logprobs, a sample still in flight, no
        n-gram match, or no room (budget, chunk tokens, chunk rows, free pages). Greedy and
        sampled rows alike: a verified row's tokens are those of plain decoding (step.verify_rows).
        A penalized row decodes plainly too (verification samples without penalties)."""
        k = min(self.spec_k, req.params.max_tokens - req.n_sampled - 1, budget - 1, chunk_room - 1)
        if k < 1 or req.want_logprobs or req.penalized or req.pending or rows_left < 1:
            return []
        drafts = lookup(req.tokens, self.max_ngram, k)
        need = -(-(req.computed + len(drafts) + 1) // self.page_size) - len(req.pages)
        return drafts if need <= self.pool.available() else []

    def _admit(self, req: Request) -> bool:
        """Give the queue's head a slot and the pages of all its tokens, if the pool has them."""
        ps = self.page_size
        total = req.total
        # At least the last token is computed, to sample from it, and it starts a page of its own.
        # A penalized request recomputes its outputs, so that the step counts them again (and
        # with a repetition penalty its prompt too, so that the step marks its tokens).
        full = (total - 1) // ps if not req.penalized else min((total - 1) // ps, len(req.prompt) // ps)
        if req.needs_prompt_lp or req.repetition != 1:  # every prompt token is computed (and marked)
            full = 0
        hits = self.pool.lookup(req.block_keys(full, ps)) if self.pool.prefix_caching else []
        need = -(-total // ps) - len(hits)
        cost = need + sum(1 for p in hits if self.pool.refs[p] == 0)  # hits leaving the LRU list
        if self.pool.available() < cost + (self.watermark if self.running else 0):
            return False
        self.waiting.popleft()
        self.pool.share(hits)
        req.slot = self.free_slots.pop()
        req.pages = list(hits)
        self.tables[req.slot, :len(hits)] = hits
        self.table_writes.append((req.slot, 0, list(hits)))
        self._take_pages(req, need)
        req.registered = len(hits)
        req.computed = len(hits) * ps
        req.status = Status.RUNNING
        req.key_skip = req.n_sampled
        self.running.append(req)
        if req.cached_tokens is None:
            req.cached_tokens = len(hits) * ps
            self.prompt_tokens += len(req.prompt)
            self.prefix_hit_tokens += len(hits) * ps
        return True


def build_batch(sched: Schedule, shapes: StepShapes, tables: np.ndarray, num_pages: int,
                max_seqs: int, page_size: int, dims: tuple[int, int] | None = None, spec_k: int = 0,
                ) -> tuple[StepBatch, list[Request | None]]:
    """The numpy StepBatch of a schedule, padded to its bucket shapes (or to dims = (D, C)), and
    the request of each sample row (None: the row samples nothing). An empty schedule gives a
    batch that changes nothing: start-up compiles every shape with those. spec_k: the drafts a
    verifying piece may hold (the static width of the spec arrays)."""
    d = len(sched.decodes)
    c = sum(p.n for p in sched.chunks)
    D = shapes.pick(max(d, 1), shapes.decode_buckets)
    C = shapes.pick(c, shapes.chunk_buckets) if c else 0
    if dims is not None:
        D, C = dims
    R, Tc = shapes.rows(C), shapes.chunk_row
    N, S = D + C, D + R
    i32 = np.int32
    tokens, positions = np.zeros(N, i32), np.zeros(N, i32)
    page, offset = np.full(N, num_pages, i32), np.zeros(N, i32)
    dec_slot, dec_len = np.full(D, max_seqs, i32), np.ones(D, i32)
    row_slot, row_start, row_len = np.full(R, max_seqs, i32), np.zeros(R, i32), np.ones(R, i32)
    row_tok, tok_row = np.zeros((R, Tc), i32), np.zeros(C, i32)
    sample_tok, sample_slot = np.zeros(S, i32), np.full(S, max_seqs, i32)
    temperature, top_k, top_p = np.zeros(S, np.float32), np.zeros(S, i32), np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    presence, frequency, repetition = np.zeros(S, np.float32), np.zeros(S, np.float32), np.ones(S, np.float32)
    count_slot, seen_slot = np.full(C, max_seqs, i32), np.full(C, max_seqs, i32)
    plp_next = np.zeros(C, i32)
    owners: list[Request | None] = [None] * S
    spec_tok, spec_drafts, spec_m = np.zeros((R, spec_k + 1), i32), np.zeros((R, spec_k), i32), np.zeros(R, i32)

    def set_sampling(i: int, req: Request) -> None:
        sample_slot[i] = req.slot
        temperature[i], top_k[i], top_p[i], min_p[i] = req.temperature, req.top_k, req.top_p, req.min_p
        presence[i], frequency[i], repetition[i] = req.presence, req.frequency, req.repetition
        owners[i] = req

    if d:
        slots = np.fromiter((r.slot for r in sched.decodes), i32, d)
        pos = np.fromiter((r.computed - 1 for r in sched.decodes), i32, d)  # computed counts this step
        positions[:d], dec_slot[:d], dec_len[:d] = pos, slots, pos + 1
        page[:d], offset[:d] = tables[slots, pos // page_size], pos % page_size
        sample_tok[:d] = np.arange(d)
        for i, r in enumerate(sched.decodes):
            set_sampling(i, r)
    cpos, row = 0, 0
    for p in sched.chunks:
        req = p.req
        if p.drafts is not None:  # one row of [last, d1..dm]
            m = len(p.drafts)
            spec_tok[row] = D + cpos + np.minimum(np.arange(spec_k + 1), m)
            spec_drafts[row, :m], spec_m[row] = p.drafts, m
        seq = req.tokens if p.drafts is None else req.tokens + p.drafts
        for r0 in range(p.start, p.start + p.n, Tc):
            rn = min(Tc, p.start + p.n - r0)
            at = np.arange(rn)
            flat = D + cpos + at                                                      # in [N]
            tokens[flat] = seq[r0:r0 + rn]
            positions[flat] = r0 + at
            page[flat] = tables[req.slot, (r0 + at) // page_size]
            offset[flat] = (r0 + at) % page_size
            row_slot[row], row_start[row], row_len[row] = req.slot, r0, rn
            row_tok[row, :rn] = cpos + at
            if req.penalized and p.drafts is None:  # recomputed outputs count again; prompt tokens are marked
                output = r0 + at >= len(req.prompt)
                count_slot[cpos + at] = np.where(output, req.slot, max_seqs)
                seen_slot[cpos + at] = np.where(output, max_seqs, req.slot)
            if req.needs_prompt_lp and p.drafts is None:
                nxt = np.minimum(r0 + at + 1, len(req.prompt) - 1)
                plp_next[cpos + at] = np.asarray(req.prompt, i32)[nxt]
            tok_row[cpos + at] = row * Tc + at
            cpos += rn
            row += 1
        if p.samples:
            sample_tok[D + row - 1] = D + cpos - 1
            set_sampling(D + row - 1, req)
    assert row <= R and cpos <= C, (row, R, cpos, C)
    batch = StepBatch(tokens, positions, page, offset, dec_slot, dec_len, row_slot, row_start,
                      row_len, row_tok, tok_row, sample_tok, sample_slot, temperature, top_k, top_p, min_p,
                      presence, frequency, repetition, count_slot, seen_slot, plp_next, spec_tok, spec_drafts,
                      spec_m)
    return batch, owners
