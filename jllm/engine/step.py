"""The engine's device step: every scheduled token of every request through the model at once.

A step is a flat token array [1, N], N = D + C (both static buckets), so the weights are read
once per step whatever mix of work it holds:

    tokens[:D]    one decode token per running request (rows past the running count are padding);
                  the token itself is read on the device from `last_token[slot]`, the slot's last
                  sample, so the host never has to know it before dispatching the step
    tokens[D:]    prompt-chunk tokens of one or a few requests, packed

Only attention sees rows: the decode part is D rows of one query (jllm.attention.paged_attention
with T=1: the paged decode kernel on GPU), the chunk part is gathered into R rows of Tc queries,
each a run of consecutive positions of one request with its own start (paged_attention with
T=Tc), and scattered back. `StepCache` is the model's cache interface (positions / write /
attend / updated) over the page pool plus this per-step metadata, so `jllm.model.transformer`
runs unchanged. Each token's keys are written to its page before attention, so a request's
chunk rows, and its decode, see the keys of the same step.

Sampling: a sampled row (each decode row, and a prompt's last chunk row) takes its slot's PRNG
key, splits it (key, sub = split(key)) and samples its [1, V] logits with `sub`, exactly what
`jllm.generate` does for one prompt, so a seeded request gives the same tokens as generate
alone. Device state (pages, per-slot keys and last tokens) is donated and updated in place.
Penalties (`sampling.penalize`) read per-slot counts of the generated tokens, marks of the
prompt's and logit biases, kept on the device: a sample adds to its slot's counts, a prompt
chunk marks its tokens (`seen_slot`), admission clears them and sets the bias, and a preempted
request's outputs are counted again as its recomputation passes them (`count_slot`).

Prompt-lookup speculation (docs/ENGINE.md): a chunk row may be [last, d1..dm] of a decoding
request; `verify_rows` samples each of its m + 1 positions as plain decoding would, with the
next m + 1 keys of the slot's chain, accepts the drafts equal to those samples, and makes the
row's sample the one after them; the slot's key moves one split per token taken.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jllm import attention as attn
from jllm.config import LlamaConfig
from jllm.kvcache import CacheOps, LayerKV, init_paged_cache
from jllm.model import Params, logits, transformer
from jllm.plan import XLA_OPTIONS, Plan
from jllm.sampling import MAX_LOGPROBS, Sampling, penalize, sample, top_logprobs, unpack_allowed
from jllm.speculative import _greedy_accept
from pallas_kernels.kv_quant import quantize_kv



@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    """One step's host-built metadata (numpy on the host, uploaded as is). Shapes: N = D + C
    tokens, D decode rows, R chunk rows of Tc queries, S = D + R sample rows. The rows' block
    tables are read on the device from EngineState.tables by slot."""
    tokens: jax.Array       # [N] int32; the decode part is replaced by last_token[dec_slot]
    positions: jax.Array    # [N] int32
    page: jax.Array         # [N] int32 pool page of each token's keys (num_pages: padding, dropped)
    offset: jax.Array       # [N] int32 slot in that page
    dec_slot: jax.Array     # [D] int32 slot of each decode row (max_seqs: padding)
    dec_len: jax.Array      # [D] int32 keys to attend, the new one included (1 for padding)
    row_slot: jax.Array     # [R] int32 slot of each chunk row (max_seqs: padding)
    row_start: jax.Array    # [R] int32 position of the row's first query
    row_len: jax.Array      # [R] int32 real queries in the row (1 for padding)
    row_tok: jax.Array      # [R, Tc] int32 index of each row query in the chunk part [C]
    tok_row: jax.Array      # [C] int32 index of each chunk token in the rows [R * Tc]
    sample_tok: jax.Array   # [S] int32 token whose logits the row samples
    sample_slot: jax.Array  # [S] int32 slot that samples (max_seqs: none)
    temperature: jax.Array  # [S] float32
    top_k: jax.Array        # [S] int32 (0: off)
    top_p: jax.Array        # [S] float32 (1: off)
    min_p: jax.Array        # [S] float32 (0: off)
    presence: jax.Array     # [S] float32 presence penalty (0: off)
    frequency: jax.Array    # [S] float32 frequency penalty (0: off)
    repetition: jax.Array   # [S] float32 repetition penalty (1: off)
    count_slot: jax.Array   # [C] int32 slot whose counts a recomputed output token adds to (max_seqs: none)
    seen_slot: jax.Array    # [C] int32 slot whose prompt_seen a prompt token marks (max_seqs: none)
    plp_next: jax.Array     # [C] int32 the prompt token after each chunk token (prompt logprobs)
    spec_tok: jax.Array     # [R, k+1] int32 chunk-row tokens whose logits verify drafts (k = 0: off)
    spec_drafts: jax.Array  # [R, k] int32 drafts a chunk row checks (its tokens after the first)
    spec_m: jax.Array       # [R] int32 drafts to check per chunk row (0: the row verifies nothing)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EngineState:
    """What stays on the device between steps (donated to every step)."""
    k_pages: list[jax.Array]               # L x [P, page_size, G, K]
    v_pages: list[jax.Array]
    k_scale_pages: list[jax.Array] | None  # L x [P, G, page_size] float32 for int8 pages
    v_scale_pages: list[jax.Array] | None
    keys: jax.Array                        # [max_seqs, *key_shape] uint32 PRNG key data per slot
    last_token: jax.Array                  # [max_seqs] int32 last sampled token per slot
    counts: jax.Array                      # [max_seqs, V] int32 each slot's generated tokens (penalties)
    prompt_seen: jax.Array                 # [max_seqs, V] bool each slot's prompt tokens (repetition penalty)
    bias: jax.Array                        # [max_seqs, V] float32 each slot's logit bias
    # [max_seqs, M] int32 each slot's block table, kept up to date by set_table_entries with what
    # the scheduler wrote since (M pages per row: a 128K-context model's tables are 8192 wide,
    # 16 MB at 512 slots, too much to send every step); entries past a row's length are stale.
    tables: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutput:
    tokens: jax.Array           # [S] int32 sampled token per sample row
    logprob: jax.Array          # [S] float32 log-probability of the sampled token
    top_ids: jax.Array          # [S, MAX_LOGPROBS] int32 most likely tokens
    top_logprobs: jax.Array     # [S, MAX_LOGPROBS] float32
    spec_out: jax.Array         # [R, k+1] int32 a verifying row's new tokens: the first spec_n + 1
    spec_n: jax.Array           # [R] int32 accepted drafts per chunk row
    plp_logprob: jax.Array      # [C'] float32 log-probability of plp_next after each chunk token
    plp_top_ids: jax.Array      # [C', MAX_LOGPROBS] int32 (C' = C with prompt_logprobs, else 0)
    plp_top_logprobs: jax.Array  # [C', MAX_LOGPROBS] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepCache(CacheOps):
    """The model's cache interface over the page pool for one step's flat token layout."""
    k_pages: list[jax.Array]
    v_pages: list[jax.Array]
    k_scale_pages: list[jax.Array] | None
    v_scale_pages: list[jax.Array] | None
    batch: StepBatch
    dec_tables: jax.Array   # [D, M] int32 the decode rows' block tables (-1: padding)
    row_tables: jax.Array   # [R, M] int32 the chunk rows'

    @property
    def quantized(self) -> bool:
        return self.k_scale_pages is not None

    def positions(self, T: int) -> jax.Array:
        assert T == self.batch.positions.shape[0], (T, self.batch.positions.shape)
        return self.batch.positions[None]                                             # [1, N]

    def write(self, i: int, k: jax.Array, v: jax.Array, n_tokens: jax.Array, fresh: bool) -> LayerKV:
        """Scatter each token's k, v [1, N, G, K] into its page (padding tokens are dropped)."""
        del n_tokens, fresh
        page, offset = self.batch.page, self.batch.offset                             # [N]
        if not self.quantized:
            return (self.k_pages[i].at[page, offset].set(k[0].astype(self.k_pages[i].dtype), mode="drop"),
                    self.v_pages[i].at[page, offset].set(v[0].astype(self.v_pages[i].dtype), mode="drop"),
                    None, None)
        out = []
        for x, pages, scale_pages in ((k, self.k_pages[i], self.k_scale_pages[i]),
                                      (v, self.v_pages[i], self.v_scale_pages[i])):
            codes, scale = quantize_kv(x)                                             # [1, N, G, K], [1, G, N]
            # Advanced indices around a slice: the indexed view is [N, G].
            out.append((pages.at[page, offset].set(codes[0], mode="drop"),
                        scale_pages.at[page, :, offset].set(scale[0].T, mode="drop")))
        (kp, ksp), (vp, vsp) = out
        return kp, vp, ksp, vsp

    def attend(self, layer: LayerKV, q: jax.Array, k: jax.Array, v: jax.Array, n_tokens: jax.Array,
               fresh: bool, plan: Plan) -> jax.Array:
        """q [1, N, H, K]: decode rows and chunk rows over their pages -> [1, N, H, K]."""
        del k, v, n_tokens, fresh
        b = self.batch
        kp, vp, ksp, vsp = layer
        scales = () if ksp is None else (ksp, vsp)
        _, N, H, K = q.shape
        D = b.dec_slot.shape[0]
        parts = []
        if D:
            qd = q[0, :D, None]                                                       # [D, 1, H, K]
            od = attn.paged_attention(qd, kp, vp, self.dec_tables, b.positions[:D], b.dec_len, plan, *scales)
            parts.append(od[:, 0])                                                    # [D, H, K]
        if N > D:
            R, Tc = b.row_tok.shape
            qr = q[0, D:][b.row_tok]                                                  # [R, Tc, H, K]
            orow = attn.paged_attention(qr, kp, vp, self.row_tables, b.row_start, b.row_start + b.row_len,
                                        plan, *scales)                                # [R, Tc, H, K]
            parts.append(orow.reshape(R * Tc, H, K)[b.tok_row])                       # [C, H, K]
        return jnp.concatenate(parts)[None]

    def updated(self, layers: list[LayerKV], n_tokens: jax.Array) -> "StepCache":
        kp, vp, ksp, vsp = (list(x) for x in zip(*layers))
        return StepCache(kp, vp, ksp if self.quantized else None, vsp if self.quantized else None, self.batch,
                         self.dec_tables, self.row_tables)


def _sample_row(row: jax.Array, key: jax.Array, t: jax.Array, k: jax.Array, p: jax.Array, mp: jax.Array,
                greedy: bool, filtered: bool = True) -> jax.Array:
    """One row's logits [V] -> its token, sampled as `generate` does for a batch of one."""
    return sample(row[None], key, Sampling(t[None], k[None], p[None], mp[None], greedy=greedy, filtered=filtered))[0]


def sample_rows(lg: jax.Array, keys: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """lg [S, V] float32, keys [S, *key_shape] key data -> tokens [S] int32 and the next keys.

    Each row splits its own key and samples [1, V]-shaped logits with the sub-key, as
    `generate` does for a batch of one, so its noise does not depend on the other rows. Under
    vmap `sample`'s greedy/stochastic choice is a select: the step holds no conditional, which
    XLA:GPU would run by reading the predicate back to the host (stalling the next dispatch)."""
    pair = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))                # [S, 2]
    nxt, sub = pair[:, 0], pair[:, 1]
    one = functools.partial(_sample_row, greedy=s.greedy, filtered=s.filtered)
    return jax.vmap(one)(lg, sub, s.temperature, s.top_k, s.top_p, s.min_p), jax.random.key_data(nxt)


def _key_chain(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """key data [*key_shape] -> the keys after 1..n splits [n, *key_shape] (data) and the sub-key
    of each split [n]: what n plain samples of a slot would use and leave."""
    def split(k, _):
        nxt, sub = jax.random.split(k)
        return nxt, (jax.random.key_data(nxt), sub)

    _, (nxts, subs) = jax.lax.scan(split, jax.random.wrap_key_data(key), length=n)
    return nxts, subs


def verify_rows(params: Params, h: jax.Array | None, batch: StepBatch, sampled: jax.Array, keys: jax.Array,
                nxt: jax.Array, plan: Plan) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """Draft verification of chunk rows, h [R, k+1, dim] (the hidden states at batch.spec_tok;
    None when k = 0), sampled [S], keys [S, *key_shape] the rows' keys before the step, nxt
    [S, *key_shape] after it -> sampled and nxt with each verifying row's replaced, and
    (spec_out [R, k+1], spec_n [R]).

    A verifying row samples its positions 0..m with the sub-keys of m + 1 successive splits of
    its key, each as a plain decode step would (greedy rows: the argmax), accepts the longest
    prefix of drafts equal to those samples (jllm.speculative's greedy rule, applied to the
    samples) and takes the sample after it; its key moves n + 1 splits, one per token taken. So
    its tokens are those of plain decoding, and with deterministic (one-hot) drafts this is the
    exact rejection rule: draft d_i is accepted with probability p_i(d_i), a rejection draws from
    p_i without d_i (the sample, given it is not d_i), and after m acceptances from p_m."""
    R, k1 = batch.spec_tok.shape
    if k1 == 1 or R == 0:  # speculation off: nothing to verify (static)
        return sampled, nxt, (jnp.zeros((R, k1), jnp.int32), jnp.zeros((R,), jnp.int32))
    D = sampled.shape[0] - R
    drafts, m = batch.spec_drafts, batch.spec_m
    lg = logits(params, h, plan)                                                    # [R, k+1, V]
    chain, subs = jax.vmap(_key_chain, in_axes=(0, None))(keys[D:], k1)             # [R, k+1, *ks], [R, k+1]
    per_pos = jax.vmap(functools.partial(_sample_row, greedy=False), in_axes=(0, 0, None, None, None, None))
    tok = jax.vmap(per_pos)(lg, subs, batch.temperature[D:], batch.top_k[D:], batch.top_p[D:],
                            batch.min_p[D:])                                                    # [R, k+1]
    n = _greedy_accept(tok, drafts, m)                                              # [R]
    rows = jnp.arange(R)
    after = tok[rows, n]
    out = jnp.concatenate([drafts, drafts[:, :1]], axis=1).at[rows, n].set(after)   # [R, k+1]
    spec = (m > 0).reshape((-1,) + (1,) * (nxt.ndim - 1))
    sampled = sampled.at[D:].set(jnp.where(m > 0, after, sampled[D:]))
    nxt = nxt.at[D:].set(jnp.where(spec, chain[rows, n], nxt[D:]))
    return sampled, nxt, (out, n)


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "greedy", "prompt_logprobs", "filtered"),
                   donate_argnames=("state",), compiler_options=XLA_OPTIONS)
def engine_step(params: Params, state: EngineState, batch: StepBatch, cfg: LlamaConfig,
                plan: Plan, greedy: bool = False, prompt_logprobs: bool = False,
                filtered: bool = True) -> tuple[EngineState, StepOutput]:
    """One engine step (module docstring) -> the new state and a token per sample row.

    greedy (static): every sample row is greedy and none asks for logprobs, so the two sorts
    over the vocabulary (top-k/top-p filtering, top logprobs) are not traced; logprobs are zeros.
    prompt_logprobs (static): also the logits after every chunk token, and from them the
    log-probability of the prompt token that follows it (batch.plp_next) and the top ones.
    filtered (static, `Sampling.filtered`): False promises no sample row cuts its distribution
    (top-k, top-p, min-p), so no sort over the vocabulary is traced for sampling."""
    max_seqs = state.last_token.shape[0]
    D = batch.dec_slot.shape[0]
    C = batch.tokens.shape[0] - D
    tokens = batch.tokens.at[:D].set(state.last_token[jnp.minimum(batch.dec_slot, max_seqs - 1)])  # [N]
    view = StepCache(state.k_pages, state.v_pages, state.k_scale_pages, state.v_scale_pages, batch,
                     _slot_tables(state.tables, batch.dec_slot), _slot_tables(state.tables, batch.row_slot))
    S, (R, k1) = batch.sample_tok.shape[0], batch.spec_tok.shape
    reads = [batch.sample_tok] + ([batch.spec_tok.reshape(-1)] if k1 > 1 else [])
    if prompt_logprobs:
        reads.append(D + jnp.arange(C, dtype=jnp.int32))
    read = jnp.concatenate(reads) if len(reads) > 1 else reads[0]
    h, view = transformer(params, tokens[None], view, cfg, plan, only=read[None])  # [1, S (+ R(k+1)) (+ C), D]
    lg = logits(params, h[0, :S], plan)                                             # [S, V]
    slot = jnp.minimum(batch.sample_slot, max_seqs - 1)
    s = Sampling(batch.temperature, batch.top_k, batch.top_p, batch.min_p, greedy=greedy, filtered=filtered)
    keys = state.keys[slot]
    # Penalties count a slot's samples; a recomputed request's outputs are counted again here,
    # and a prompt's tokens are marked as its chunks pass.
    counts = state.counts.at[batch.count_slot, tokens[D:]].add(1, mode="drop")
    prompt_seen = state.prompt_seen.at[batch.seen_slot, tokens[D:]].set(True, mode="drop")
    # greedy (static) promises no row is penalized (Engine._greedy)
    lg_s = lg if greedy else penalize(lg, counts[slot], batch.presence, batch.frequency, batch.repetition,
                                      prompt_seen[slot], state.bias[slot])
    sampled, nxt = sample_rows(lg_s, keys, s)
    h_spec = h[0, S:S + R * k1].reshape(R, k1, h.shape[-1]) if k1 > 1 else None     # [R, k+1, D]
    sampled, nxt, spec = verify_rows(params, h_spec, batch, sampled, keys, nxt, plan)
    if greedy:
        S = sampled.shape[0]
        lp = (jnp.zeros((S,), jnp.float32), jnp.zeros((S, MAX_LOGPROBS), jnp.int32),
              jnp.zeros((S, MAX_LOGPROBS), jnp.float32))
    else:  # no conditional (as in sample_rows); read back when asked
        lp = top_logprobs(lg, sampled)
    if prompt_logprobs:
        h_plp = h[0, h.shape[1] - C:]                                               # [C, D]
        plp = top_logprobs(logits(params, h_plp, plan), batch.plp_next)
    else:
        plp = (jnp.zeros((0,), jnp.float32), jnp.zeros((0, MAX_LOGPROBS), jnp.int32),
               jnp.zeros((0, MAX_LOGPROBS), jnp.float32))
    state = EngineState(k_pages=view.k_pages, v_pages=view.v_pages, k_scale_pages=view.k_scale_pages,
                        v_scale_pages=view.v_scale_pages,
                        keys=state.keys.at[batch.sample_slot].set(nxt, mode="drop"),
                        last_token=state.last_token.at[batch.sample_slot].set(sampled, mode="drop"),
                        counts=_replicated(counts.at[batch.sample_slot, sampled].add(1, mode="drop"), plan),
                        prompt_seen=_replicated(prompt_seen, plan), bias=state.bias, tables=state.tables)
    return state, StepOutput(sampled, *lp, *spec, *plp)


def _slot_tables(tables: jax.Array, slots: jax.Array) -> jax.Array:
    """The block tables [n, M] of slots [n] (max_seqs, padding: all -1)."""
    max_seqs = tables.shape[0]
    return jnp.where((slots < max_seqs)[:, None], tables[jnp.minimum(slots, max_seqs - 1)], -1)


TABLE_WRITES = 512  # block-table entries one set_table_entries call writes (a static shape)


@functools.partial(jax.jit, donate_argnames=("tables",))
def set_table_entries(tables: jax.Array, slot: jax.Array, col: jax.Array, page: jax.Array) -> jax.Array:
    """tables [max_seqs, M] with page [TABLE_WRITES] at (slot, col) (slot max_seqs: none; each
    (slot, col) at most once)."""
    return tables.at[slot, col].set(page, mode="drop")


def _replicated(x: jax.Array, plan: Plan) -> jax.Array:
    """x replicated over the mesh, as init_state makes it: the sharding every step program is
    compiled for (a vocabulary-sharded penalty would otherwise leave the counts split)."""
    return jax.lax.with_sharding_constraint(x, PartitionSpec()) if plan.sharded else x


@functools.partial(jax.jit, donate_argnames=("counts", "prompt_seen", "bias"))
def reset_penalties(counts: jax.Array, prompt_seen: jax.Array, bias: jax.Array, mask: jax.Array,
                    bias_slot: jax.Array, bias_id: jax.Array, bias_value: jax.Array,
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Clear the penalty state of the slots where mask [max_seqs] is set (admitted requests),
    then set their logit biases: bias_value [E] at (bias_slot, bias_id) [E] (slot max_seqs: none)."""
    bias = jnp.where(mask[:, None], 0.0, bias).at[bias_slot, bias_id].set(bias_value, mode="drop")
    return jnp.where(mask[:, None], 0, counts), prompt_seen & ~mask[:, None], bias


GUIDED_ROWS = 8  # slots whose logit bias one set_bias_rows call overwrites (a static shape)


@functools.partial(jax.jit, donate_argnames=("bias",))
def set_bias_rows(bias: jax.Array, slots: jax.Array, words: jax.Array, entry_row: jax.Array,
                  entry_id: jax.Array, entry_value: jax.Array) -> jax.Array:
    """Overwrite the logit bias of slots [GUIDED_ROWS] (max_seqs: none) for a guided request's
    next sample: its logit_bias entries (entry_value [E] at row entry_row [E] (GUIDED_ROWS: none),
    token entry_id [E]) where its grammar allows a token (words [GUIDED_ROWS, ceil(V / 32)]
    uint32, packed: `sampling.unpack_allowed`), -inf elsewhere."""
    rows = jnp.zeros((slots.shape[0], bias.shape[1]), bias.dtype)
    rows = rows.at[entry_row, entry_id].set(entry_value, mode="drop")
    rows = jnp.where(unpack_allowed(words, bias.shape[1]), rows, -jnp.inf)
    return bias.at[slots].set(rows, mode="drop")


@functools.partial(jax.jit, static_argnames=("resume",), donate_argnames=("keys",))
def reset_keys(keys: jax.Array, mask: jax.Array, seeds: jax.Array, skips: jax.Array,
               resume: bool) -> jax.Array:
    """Slots where mask [max_seqs] is set get jax.random.key(seed), split `skips` times if
    `resume` (the key a request holds after that many samples: a preempted request resumes its
    key chain; the loop is a separate program so that fresh admissions run none)."""
    fresh = jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(seeds)      # [max_seqs, *key_shape]

    def advance(i, k):
        nxt = jax.random.key_data(jax.vmap(jax.random.split)(jax.random.wrap_key_data(k))[:, 0])
        return jnp.where((i < skips).reshape((-1,) + (1,) * (k.ndim - 1)), nxt, k)

    if resume:
        fresh = jax.lax.fori_loop(0, jnp.max(jnp.where(mask, skips, 0)), advance, fresh)
    return jnp.where(mask.reshape((-1,) + (1,) * (keys.ndim - 1)), fresh, keys)


def init_state(cfg: LlamaConfig, num_pages: int, page_size: int, max_seqs: int, dtype,
               mesh=None, max_pages: int = 1) -> EngineState:
    """Zeroed pages (split over the mesh's KV heads when there is a mesh) and slot state, with
    block tables of max_pages entries per slot."""
    if mesh is None:
        cache = init_paged_cache(cfg, num_pages, page_size, 1, 1, dtype)
    else:
        from jllm import parallel
        cache = parallel.init_paged_cache(cfg, num_pages, page_size, 1, 1, dtype, mesh)
    key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
    keys = jnp.zeros((max_seqs, *key_shape), jnp.uint32)
    last = jnp.zeros((max_seqs,), jnp.int32)
    counts = jnp.zeros((max_seqs, cfg.vocab_size), jnp.int32)
    seen = jnp.zeros((max_seqs, cfg.vocab_size), bool)
    bias = jnp.zeros((max_seqs, cfg.vocab_size), jnp.float32)
    tables = jnp.full((max_seqs, max_pages), -1, jnp.int32)
    if mesh is not None:
        from jax.sharding import NamedSharding
        keys, last, counts, seen, bias, tables = jax.device_put((keys, last, counts, seen, bias, tables),
                                                                NamedSharding(mesh, PartitionSpec()))
    return EngineState(cache.k_pages, cache.v_pages, cache.k_scale_pages, cache.v_scale_pages, keys, last, counts,
                       seen, bias, tables)
