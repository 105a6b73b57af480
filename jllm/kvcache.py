"""KV caches: the static `KVCache` and the paged `PagedKVCache`, with one interface the model calls.

Both are pytrees passed into the model and returned (donated by the jitted steps, so their buffers
are updated in place). The model asks the cache these things:

    pos = cache.positions(T)                                  # [B, T] positions of the new tokens
    layer, o = cache.write_attend(i, q, k, v, pos, n_tokens, fresh, plan, cfg.rope)  # per layer:
    layer = cache.write(i, k, v, n_tokens, fresh)             #   new k, v [B, T, G, K] stored
    o = cache.attend(layer, q, k, v, n_tokens, fresh, plan)   #   q [B, T, H, K] -> [B, T, H, K]
    cache = cache.updated(layers, n_tokens)                   # after the last layer

`write_attend` takes q and k before RoPE: it rotates them at `pos`, then runs `write` and `attend`
(`CacheOps`). The static float cache's decode step with the Pallas kernels does all three in one
kernel, which rotates q and the new key and stores the key while it attends.

An int8 cache (either kind) stores codes with one float32 scale per token and KV head
(pallas_kernels.kv_quant): half the bytes of bf16 (plus 4 per head_dim), which is what decode at
long context reads. Prefill over empty rows (`fresh`) attends the new keys unrounded.

The paged cache keeps the model's per-token layout in a pool of pages shared by all rows:
k_pages, v_pages L x [P, page_size, G, K], so slot i of page p holds the [G, K] keys of every KV
head, like one position of the static cache. One page table serves every layer: `free` [P],
`block_tables` [B, max_pages] (-1 = no page) and `lengths` [B]. Page management (`reserve`,
`release`) is pure and jit-able; a serving engine may equally keep the table on the host and
pass it in each step.
"""
import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from jllm import attention as attn
from jllm.config import LlamaConfig, Rope
from jllm.plan import Plan
from pallas_kernels.kv_quant import dequantize_kv, quantize_kv

KV_DTYPES = ("bfloat16", "float16", "float32", "int8")
LayerKV = tuple  # one layer's buffers after a write: (k, v, k_scale, v_scale), scales None if float


def _check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype.name not in KV_DTYPES:
        raise ValueError(f"cache dtype {dtype.name!r}; expected one of {KV_DTYPES}")
    return dtype


def _check_sizes(cfg: LlamaConfig, **sizes) -> None:
    """TypeError unless cfg is a LlamaConfig; ValueError naming a size that is not an int >= 1."""
    if not isinstance(cfg, LlamaConfig):
        raise TypeError(f"cfg={cfg!r:.80} must be a LlamaConfig (e.g. LlamaConfig.from_name('tiny'))")
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")


class CacheOps:
    """What every cache answers the same way: positions from its lengths, and `write_attend`
    through its own `write` and `attend`."""

    def positions(self, T: int) -> jax.Array:
        return self.lengths[:, None] + jnp.arange(T)                                  # [B, T]

    def write_attend(self, i: int, q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
                     n_tokens: jax.Array, fresh: bool, plan: Plan, rotary: Rope | float,
                     ) -> tuple[LayerKV, jax.Array]:
        """RoPE (rotary: LlamaConfig.rope) on q [B, T, H, K] and k [B, T, G, K] at pos [B, T],
        store layer i's new k, v, then attend q over the layer -> (layer's buffers, [B, T, H, K])."""
        q, k = attn.rope(q, pos, rotary), attn.rope(k, pos, rotary)
        layer = self.write(i, k, v, n_tokens, fresh)
        return layer, self.attend(layer, q, k, v, n_tokens, fresh, plan)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache(CacheOps):
    """Static KV cache: one buffer per layer, so each is updated in place by the donated step.

    Key s of head g in an int8 cache is k[b, s, g] * k_scale[b, g, s]; the scales are [B, G, S]
    so that the decode kernel reads one head's scales contiguously.

    A step of T new tokens needs lengths[b] + T <= max_len: more new tokens than max_len is a
    ValueError, but a row's lengths are data, so positions past max_len are dropped unchecked
    (attention then misses those keys): size the cache for the prompt plus every new token.
    """
    k: list[jax.Array]   # L x [B, S, G, K]
    v: list[jax.Array]   # L x [B, S, G, K]
    lengths: jax.Array   # [B] int32, tokens already cached per row
    k_scale: list[jax.Array] | None = None  # L x [B, G, S] float32 for an int8 cache, else None
    v_scale: list[jax.Array] | None = None

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, i: int, k: jax.Array, v: jax.Array, n_tokens: jax.Array, fresh: bool) -> LayerKV:
        """Store new k, v [B, T, G, K] of layer i at each row's length -> the layer's buffers.

        Padding tokens (t >= n_tokens) are written too: they lie past the row's new length, where
        attention never looks and the next write lands."""
        del n_tokens
        if k.shape[1] > self.max_len:  # static: else the new keys past max_len would be dropped
            raise ValueError(f"{k.shape[1]} new tokens do not fit a cache of max_len={self.max_len}")
        start = self.lengths
        if not self.quantized:
            return _write(self.k[i], k, start, fresh), _write(self.v[i], v, start, fresh), None, None
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        return (_write(self.k[i], kq, start, fresh), _write(self.v[i], vq, start, fresh),
                _write(self.k_scale[i], ks, start, fresh), _write(self.v_scale[i], vs, start, fresh))

    def attend(self, layer: LayerKV, q: jax.Array, k: jax.Array, v: jax.Array, n_tokens: jax.Array,
               fresh: bool, plan: Plan) -> jax.Array:
        """q [B, T, H, K] over the layer's keys (the new ones included) -> [B, T, H, K]."""
        start, kv_len = self.lengths, self.lengths + n_tokens
        ck, cv, cks, cvs = layer
        if fresh and not self.quantized and plan.attn_impl == "pallas" and attn.supported(q, ck):
            # The flash kernel reads only the keys below kv_len, so the cache costs it no more than
            # the new keys do; read there, the rotated keys have one consumer, and XLA writes them
            # into the cache in place instead of to a buffer of their own and then a copy.
            return attn.attention(q, ck, cv, start, kv_len, plan)
        if fresh:  # every row starts empty: attend the new keys (a float cache's dtype first)
            kd = k.dtype if self.quantized else ck.dtype
            return attn.attention(q, k.astype(kd), v.astype(kd), start, n_tokens, plan)
        if self.quantized and q.shape[1] > 1:  # a chunk over an int8 cache: dequantize once
            return attn.attention(q, dequantize_kv(ck, cks, q.dtype), dequantize_kv(cv, cvs, q.dtype),
                                  start, kv_len, plan)
        return attn.attention(q, ck, cv, start, kv_len, plan, cks, cvs)  # decode reads the codes

    def write_attend(self, i: int, q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
                     n_tokens: jax.Array, fresh: bool, plan: Plan, rotary: Rope | float,
                     ) -> tuple[LayerKV, jax.Array]:
        """`CacheOps.write_attend`; a decode step runs as one Pallas kernel where the plan's
        attention allows (pos is then self.lengths): over a float cache (attention.decode_append),
        and over an int8 cache with one query head per KV head (attention.decode_append_int8,
        which also rounds the new key and value to int8)."""
        if q.shape[1] == 1 and not fresh and not self.quantized:
            fused = attn.decode_append(q, self.k[i], self.v[i], k, v, self.lengths, self.lengths + n_tokens,
                                       plan, rotary)
            if fused is not None:
                o, ck, cv = fused
                return (ck, cv, None, None), o
        if q.shape[1] == 1 and not fresh and self.quantized:
            fused = attn.decode_append_int8(q, self.k[i], self.v[i], self.k_scale[i], self.v_scale[i], k, v,
                                            self.lengths, self.lengths + n_tokens, plan, rotary)
            if fused is not None:
                o, *layer = fused
                return tuple(layer), o
        return super().write_attend(i, q, k, v, pos, n_tokens, fresh, plan, rotary)

    def updated(self, layers: list[LayerKV], n_tokens: jax.Array) -> "KVCache":
        k, v, ks, vs = (list(b) for b in zip(*layers))
        return KVCache(k=k, v=v, lengths=self.lengths + n_tokens, k_scale=ks if self.quantized else None,
                       v_scale=vs if self.quantized else None)


def _write(buf: jax.Array, new: jax.Array, start: jax.Array, fresh: bool) -> jax.Array:
    """Write new [B, T, G, K] into buf [B, S, G, K] (or scales new [B, G, T] into buf [B, G, S])
    at row offsets start [B]."""
    if fresh:  # every row starts at 0: one contiguous in-place update
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0,) * buf.ndim)
    B, T = new.shape[0], new.shape[-1 if new.ndim == 3 else 1]
    pos = start[:, None] + jnp.arange(T)                                          # [B, T]
    if new.ndim == 3:  # scales [B, G, T]; G passes through (an index on it would make a sharded
        # scatter gather its operands): the indexed result is [B, T, G]
        return buf.at[jnp.arange(B)[:, None], :, pos].set(new.transpose(0, 2, 1), mode="drop")
    return buf.at[jnp.arange(B)[:, None], pos].set(new.astype(buf.dtype), mode="drop")


def _empty_layers(n_layers: int, shape: tuple, scale_shape: tuple, dtype: jnp.dtype) -> tuple:
    """k, v: n_layers zero buffers of `shape` each; for int8 also k, v scales: n_layers float32 zero
    buffers of `scale_shape` each (else None). Separate buffers: a donated cache must not hold one
    array twice."""
    def zeros(shape, dtype):
        return [jnp.zeros(shape, dtype) for _ in range(n_layers)]
    k, v = zeros(shape, dtype), zeros(shape, dtype)
    if dtype != jnp.int8:
        return k, v, None, None
    return k, v, zeros(scale_shape, jnp.float32), zeros(scale_shape, jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty static cache (one jitted call: eager zeros would be one dispatch per buffer).

    dtype int8 makes an int8 cache with per-token, per-head scales."""
    _check_sizes(cfg, batch=batch, max_len=max_len)
    k, v, ks, vs = _empty_layers(cfg.n_layers, (batch, max_len, cfg.n_kv_heads, cfg.head_dim),
                                 (batch, cfg.n_kv_heads, max_len), _check_dtype(dtype))
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32), k_scale=ks, v_scale=vs)


# --- The paged cache ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageTable:
    """Which pool pages each row owns. free [P] bool (True = unused); block_tables [B, max_pages]
    int32 (-1 = none); lengths [B] int32 tokens stored per row."""
    free: jax.Array
    block_tables: jax.Array
    lengths: jax.Array

    @property
    def max_pages(self) -> int:
        return self.block_tables.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache(CacheOps):
    """Every layer's pages and one page table (module docstring)."""
    k_pages: list[jax.Array]   # L x [P, page_size, G, K]
    v_pages: list[jax.Array]   # L x [P, page_size, G, K]
    table: PageTable
    k_scale_pages: list[jax.Array] | None = None  # L x [P, G, page_size] float32, int8 pages only
    v_scale_pages: list[jax.Array] | None = None

    @property
    def lengths(self) -> jax.Array:
        return self.table.lengths

    @property
    def block_tables(self) -> jax.Array:
        return self.table.block_tables

    @property
    def page_size(self) -> int:
        return self.k_pages[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.k_pages[0].shape[0]

    @property
    def quantized(self) -> bool:
        return self.k_scale_pages is not None

    def slots(self, n_tokens: jax.Array, T: int) -> tuple[jax.Array, jax.Array]:
        """Pool page and slot in page of each new token [B, T]; page P (dropped by the scatter)
        for padding tokens and tokens past the row's pages."""
        pos = self.positions(T)                                                        # [B, T]
        logical = pos // self.page_size
        page = jnp.take_along_axis(self.block_tables, jnp.minimum(logical, self.table.max_pages - 1), axis=1)
        ok = (jnp.arange(T)[None, :] < n_tokens[:, None]) & (logical < self.table.max_pages) & (page >= 0)
        return jnp.where(ok, page, self.num_pages), pos % self.page_size

    def write(self, i: int, k: jax.Array, v: jax.Array, n_tokens: jax.Array, fresh: bool) -> LayerKV:
        """Store the first n_tokens[b] of k, v [B, T, G, K] through the block tables (pages must be
        reserved first; tokens without a page are dropped). An int8 cache quantizes float k, v itself."""
        del fresh
        if self.quantized and not (jnp.issubdtype(k.dtype, jnp.floating) and jnp.issubdtype(v.dtype, jnp.floating)):
            raise TypeError(f"an int8 cache quantizes float k, v itself; got {k.dtype=} {v.dtype=}")
        page, slot = self.slots(n_tokens, k.shape[1])                                 # [B, T]

        def put(pages, new):  # new [B, T, G, K]
            return pages.at[page, slot].set(new.astype(pages.dtype), mode="drop")

        def put_scale(pages, new):  # new [B, G, T]; advanced indices around a slice: the view is [B, T, G]
            return pages.at[page, :, slot].set(new.transpose(0, 2, 1), mode="drop")

        if not self.quantized:
            return put(self.k_pages[i], k), put(self.v_pages[i], v), None, None
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        return (put(self.k_pages[i], kq), put(self.v_pages[i], vq),
                put_scale(self.k_scale_pages[i], ks), put_scale(self.v_scale_pages[i], vs))

    def attend(self, layer: LayerKV, q: jax.Array, k: jax.Array, v: jax.Array, n_tokens: jax.Array,
               fresh: bool, plan: Plan) -> jax.Array:
        """q [B, T, H, K] over the row's pages (the new keys included) -> [B, T, H, K]."""
        start = self.lengths
        if fresh:  # rows start empty: the new keys are all there is
            kd = k.dtype if self.quantized else layer[0].dtype
            return attn.attention(q, k.astype(kd), v.astype(kd), start, n_tokens, plan)
        kp, vp, ksp, vsp = layer
        scales = () if ksp is None else (ksp, vsp)
        return attn.paged_attention(q, kp, vp, self.block_tables, start, start + n_tokens, plan, *scales)

    def updated(self, layers: list[LayerKV], n_tokens: jax.Array) -> "PagedKVCache":
        kp, vp, ksp, vsp = (list(b) for b in zip(*layers))
        table = dataclasses.replace(self.table, lengths=self.lengths + n_tokens)
        return PagedKVCache(k_pages=kp, v_pages=vp, table=table, k_scale_pages=ksp if self.quantized else None,
                            v_scale_pages=vsp if self.quantized else None)


def init_page_table(num_pages: int, batch: int, max_pages: int) -> PageTable:
    """All pages free, no row owns a page, all lengths 0."""
    return PageTable(free=jnp.ones((num_pages,), bool), block_tables=jnp.full((batch, max_pages), -1, jnp.int32),
                     lengths=jnp.zeros((batch,), jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def init_paged_cache(cfg: LlamaConfig, num_pages: int, page_size: int, batch: int, max_pages: int,
                     dtype=jnp.bfloat16) -> PagedKVCache:
    """An empty paged cache: num_pages pages of page_size tokens per layer, `batch` rows of up to
    max_pages pages each. dtype int8 makes int8 pages with float32 scale pages [P, G, page_size]."""
    _check_sizes(cfg, num_pages=num_pages, page_size=page_size, batch=batch, max_pages=max_pages)
    k, v, ks, vs = _empty_layers(cfg.n_layers, (num_pages, page_size, cfg.n_kv_heads, cfg.head_dim),
                                 (num_pages, cfg.n_kv_heads, page_size), _check_dtype(dtype))
    return PagedKVCache(k_pages=k, v_pages=v, table=init_page_table(num_pages, batch, max_pages),
                        k_scale_pages=ks, v_scale_pages=vs)


def _take_free(free: jax.Array, need: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gives the k-th needing slot the k-th free page (lowest ids first).

    free [P] bool, need [N] bool -> (free [P] with those pages taken, page [N] int32; -1 where
    nothing was needed or the pool ran dry).
    """
    num_pages = free.shape[0]
    candidates = jnp.nonzero(free, size=need.shape[0], fill_value=num_pages)[0]  # [N]
    rank = jnp.clip(jnp.cumsum(need) - 1, 0, need.shape[0] - 1)
    page = jnp.where(need, candidates[rank], num_pages)  # [N]
    free = free.at[page].set(False, mode="drop")  # index P (none / dry) is dropped
    return free, jnp.where(page < num_pages, page, -1).astype(jnp.int32)


def reserve(table: PageTable, num_tokens: jax.Array, page_size: int) -> PageTable:
    """Give every row the pages to hold num_tokens [B] tokens in all; pages a row owns are kept.

    A row holds at most max_pages pages: tokens past max_pages * page_size get none (their writes
    are dropped). If the pool runs dry the missing entries stay -1: check `pages_needed` against
    the free count first (a scheduler does this on the host before it admits work)."""
    B, max_pages = table.block_tables.shape
    n_pages = -(-num_tokens // page_size)                                              # [B]
    need = (jnp.arange(max_pages)[None, :] < n_pages[:, None]) & (table.block_tables < 0)  # [B, max_pages]
    free, page = _take_free(table.free, need.reshape(-1))
    tables = jnp.where(need, page.reshape(B, max_pages), table.block_tables)
    return dataclasses.replace(table, free=free, block_tables=tables)


def pages_needed(table: PageTable, num_tokens: jax.Array, page_size: int) -> jax.Array:
    """How many new pages `reserve(table, num_tokens)` takes (scalar int32)."""
    n_pages = jnp.minimum(-(-num_tokens // page_size), table.max_pages)  # as reserve: no more per row
    owned = jnp.sum(table.block_tables >= 0, axis=1)
    return jnp.sum(jnp.maximum(n_pages - owned, 0))


def release(table: PageTable, rows: jax.Array) -> PageTable:
    """Return the pages of the rows where rows [B] is True to the pool and empty those rows."""
    tables = table.block_tables
    give = rows[:, None] & (tables >= 0)                                               # [B, max_pages]
    free = table.free.at[jnp.where(give, tables, table.free.shape[0])].set(True, mode="drop")
    return PageTable(free=free, block_tables=jnp.where(rows[:, None], -1, tables),
                     lengths=jnp.where(rows, 0, table.lengths))


def gather(cache: PagedKVCache, i: int) -> tuple[jax.Array, jax.Array]:
    """Layer i of every row as a contiguous float cache: k, v [B, max_pages * page_size, G, K],
    zeros past each row's length (int8 pages dequantized in float32): for tests and references."""
    k = attn.gather_pages(cache.k_pages[i], cache.block_tables)
    v = attn.gather_pages(cache.v_pages[i], cache.block_tables)
    if cache.quantized:
        k = dequantize_kv(k, attn.gather_scale_pages(cache.k_scale_pages[i], cache.block_tables), jnp.float32)
        v = dequantize_kv(v, attn.gather_scale_pages(cache.v_scale_pages[i], cache.block_tables), jnp.float32)
    keep = jnp.arange(k.shape[1])[None, :] < cache.lengths[:, None]                   # [B, S]
    return jnp.where(keep[..., None, None], k, 0), jnp.where(keep[..., None, None], v, 0)
