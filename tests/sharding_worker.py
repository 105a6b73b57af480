"""Sharded runs for tests/test_sharding.py and tests/test_multihost.py, in a fresh process.

The test process has already started jax with one CPU device, so the sharded checks run here,
where the device count is set before jax starts:

    python tests/sharding_worker.py sharded OUT.pkl
        8 CPU devices; every case of test_sharding.py, results pickled for the test to assert on.
    python tests/sharding_worker.py multihost OUT.json CKPT PROMPTS COORDINATOR NUM_PROCESSES PROCESS_ID
        2 CPU devices; joins the others through jax.distributed (gloo), restores CKPT sharded on a
        1 x (2 * NUM_PROCESSES) mesh and generates greedily from PROMPTS (JSON lists of token
        ids); process 0 writes the tokens.
"""
import json
import os
import pickle
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODE = sys.argv[1] if len(sys.argv) > 1 else ""
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JLLM_CACHE_DIR"] = "off"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           + ("8" if MODE == "sharded" else "2"))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jllm  # noqa: E402
from jllm import attention, parallel, quant  # noqa: E402
from jllm.config import LlamaConfig  # noqa: E402
from jllm.generate import Model, decode, prefill  # noqa: E402
from jllm.attention import attention_xla  # noqa: E402
from jllm.kvcache import init_cache  # noqa: E402
from jllm.model import forward, from_flat, to_flat  # noqa: E402
from jllm.plan import Plan, make_plan  # noqa: E402
from jllm.sampling import Sampling  # noqa: E402
from sharding import rules  # noqa: E402

# n_heads = 8 and head_dim = 16 (the Pallas kernels' smallest): every mesh of 8 devices divides it.
MHA = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=256, vocab_size=512,
                  max_seq_len=256)
GQA = dataclasses.replace(MHA, n_kv_heads=2)  # fewer KV heads than tp = 4: replicated
PROMPTS = [[1, 5, 9, 22, 40, 7, 300], [1, 200, 3]]
MAX_NEW = 10
# Prompts for the logits check: [B, T] with B a multiple of every data axis size used.
LOGIT_TOKENS = np.random.default_rng(0).integers(3, MHA.vocab_size, (8, 16)).astype(np.int32)


def random_flat(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    from conftest import random_flat as rf  # decisive logits: greedy tokens have no near-ties
    return rf(cfg, seed)


def mesh_of(dp: int, tp: int):
    return rules.make_mesh(tp, dp, devices=jax.devices()[:dp * tp])


def greedy(model: Model) -> list[list[int]]:
    return [r.tokens for r in jllm.generate(model, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[])]


_forward = jax.jit(forward, static_argnames=("cfg", "plan"))


def logits(model: Model) -> np.ndarray:
    """Full-prompt logits [B, T, V] of LOGIT_TOKENS, sharded like generate when model.mesh is set."""
    cfg, (B, T) = model.cfg, LOGIT_TOKENS.shape
    if model.mesh is None:
        out, _ = _forward(model.params, jnp.asarray(LOGIT_TOKENS), init_cache(cfg, B, 32, model.cache_dtype),
                          cfg, model.plan)
        return np.asarray(out)
    with parallel.mesh_context(model.mesh):
        cache = parallel.init_cache(cfg, B, 32, model.cache_dtype, model.mesh)
        tokens = parallel.put_batch(LOGIT_TOKENS, model.mesh)
        out, _ = _forward(model.params, tokens, cache, cfg, model.plan)
    return parallel.to_host(out)


def run_model(params, cfg, mesh, tokens: bool = True, **options) -> dict:
    model = Model(params=params, cfg=cfg, mesh=mesh, **{"attn_impl": "xla", "matmul_impl": "xla", **options})
    return {"tokens": greedy(model) if tokens else None, "logits": logits(model)}


def compare(params, cfg, mesh, tokens: bool = True, **options) -> dict:
    return {"ref": run_model(params, cfg, None, tokens, **options),
            "sharded": run_model(parallel.shard_params(params, cfg, mesh), cfg, mesh, tokens, **options)}


def case_float32() -> dict:
    """{case id: {"ref": unsharded results, "sharded": sharded results}}: float32, MHA and GQA."""
    f32 = from_flat({name: jnp.asarray(w) for name, w in random_flat(MHA).items()}, MHA)
    ref = run_model(f32, MHA, None)
    out = {}
    for dp, tp in ((1, 8), (2, 4), (8, 1)):
        mesh = mesh_of(dp, tp)
        sharded = run_model(parallel.shard_params(f32, MHA, mesh), MHA, mesh)
        out[f"float32_{dp=}_{tp=}"] = {"ref": ref, "sharded": sharded}
    gqa = from_flat({name: jnp.asarray(w) for name, w in random_flat(GQA, 1).items()}, GQA)
    out["float32_gqa_kv2_dp=2_tp=4"] = compare(gqa, GQA, mesh_of(2, 4))
    return out


def case_low_precision() -> dict:
    """bfloat16 on 1 x 8 (the shapes case_hlo inspects), int8 and int4 QArrays on 2 x 4."""
    bf16 = {name: jnp.asarray(w, jnp.bfloat16) for name, w in random_flat(MHA).items()}
    out = {"bfloat16_dp=1_tp=8": compare(from_flat(bf16, MHA), MHA, mesh_of(1, 8))}
    for mode, group_size in (("int8", None), ("int4", 32)):
        flat, _ = quant.quantize_flat(dict(bf16), mode, group_size)
        out[f"{mode}_dp=2_tp=4"] = compare(from_flat(flat, MHA), MHA, mesh_of(2, 4), tokens=mode == "int8")
    # An int8 KV cache: its scales shard with the KV heads (split on 2 x 4; replicated for GQA
    # on 1 x 4, where the Pallas decode kernel reads the codes and scales per shard).
    f32 = from_flat({name: jnp.asarray(w) for name, w in random_flat(MHA).items()}, MHA)
    out["kvint8_dp=2_tp=4"] = compare(f32, MHA, mesh_of(2, 4), kv_cache_dtype="int8")
    gqa = from_flat({name: jnp.asarray(w) for name, w in random_flat(GQA, 1).items()}, GQA)
    out["kvint8_gqa_pallas_dp=1_tp=4"] = compare(gqa, GQA, mesh_of(1, 4), kv_cache_dtype="int8",
                                                 attn_impl="pallas")
    return out


def case_pallas() -> dict:
    """Pallas attention (interpret mode) run per shard under shard_map vs. unsharded XLA attention."""
    out = {}
    rng = np.random.default_rng(2)
    cases = {"decode_kv_split_dp=2_tp=4": (2, 4, 8, 1), "prefill_kv_replicated_dp=1_tp=4": (1, 4, 2, 16)}
    for name, (dp, tp, G, T) in cases.items():
        mesh = mesh_of(dp, tp)
        B, S, H, K = 4, 32, 8, 16
        k = jnp.asarray(rng.normal(size=(B, S, G, K)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(B, S, G, K)), jnp.float32)
        q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
        q_offset = jnp.asarray([0, 3, 7, 16] if T > 1 else [4, 9, 31, 1], jnp.int32)  # ragged rows
        kv_len = q_offset + T
        want = attention_xla(q, k, v, q_offset, kv_len)
        with parallel.mesh_context(mesh):
            args = parallel.put_batch(tuple(np.asarray(x) for x in (q, k, v, q_offset, kv_len)), mesh)
            plan = make_plan(GQA if G == 2 else MHA, mesh, "pallas", "xla")
            got = jax.jit(lambda *a: attention.attention(*a, plan))(*args)
        out[name] = {"got": np.asarray(got), "want": np.asarray(want)}
    return out


def case_pallas_matmul() -> dict:
    """The quantized Pallas matmul (interpret mode) per shard on 1 x 4 vs one device: batch-1
    greedy decode (M = 1 takes the kernel for int8 too), and what the compiled decode step does.
    The "_fused" cases run q/k/v and gate/up as one launch per shard (matmul_impl="pallas-fused")
    against the one-device per-weight kernel; with 2 KV heads on tp = 4, wq is split while wk/wv
    are replicated, so one launch mixes split and whole weights."""
    out = {}
    mesh = mesh_of(1, 4)
    cases = [(mode, gs, name, cfg, "pallas") for mode, gs in (("int8", None), ("int4", 32))
             for name, cfg in (("mha", MHA), ("gqa_kv2", GQA))]
    cases += [("int8", None, "gqa_kv2", GQA, "pallas-fused"), ("int4", 32, "mha", MHA, "pallas-fused"),
              ("bf16", None, "gqa_kv2", GQA, "pallas-fused"), ("bf16", None, "mha", MHA, "pallas-fused")]
    for mode, group_size, name, cfg, impl in cases:
        bf16 = {n: jnp.asarray(w, jnp.bfloat16) for n, w in random_flat(cfg, 3).items()}
        if mode == "bf16":  # plain weights: the kernel's bits=16 GEMV, against one device's
            params, ref_impl = from_flat(bf16, cfg), "pallas-fused"
        else:
            params, ref_impl = from_flat(quant.quantize_flat(dict(bf16), mode, group_size)[0], cfg), "pallas"
        models = {"ref": Model(params=params, cfg=cfg, attn_impl="xla", matmul_impl=ref_impl),
                  "sharded": Model(params=parallel.shard_params(params, cfg, mesh), cfg=cfg,
                                   attn_impl="xla", matmul_impl=impl, mesh=mesh)}
        r = {k: [t.tokens for t in jllm.generate(m, PROMPTS[:1], max_new_tokens=MAX_NEW,
                                                 stop_token_ids=[])] for k, m in models.items()}
        m = models["sharded"]
        with parallel.mesh_context(mesh):
            cache = parallel.init_cache(cfg, 1, 64, jnp.bfloat16, mesh)
            tok, samp, key = parallel.put_batch(
                (np.zeros((1,), np.int32), Sampling.make(1), jax.random.key(0)), mesh)
            hlo = decode.lower(m.params, tok, cache, samp, key, cfg=cfg, n_steps=2,
                               plan=m.plan).compile().as_text()
        r["collectives"] = _collectives(hlo)
        r["kernel_in_hlo"] = "quant_matmul" in hlo
        bits = {"int8": 8, "int4": 4, "bf16": 16}[mode]
        r["fused_kernels_in_hlo"] = sorted({f"x{w}" for w in (2, 3) if f"quant_matmul_int{bits}_x{w}" in hlo})
        r["weight_elements"] = min(int(np.prod(w.shape)) for w in bf16.values() if w.ndim == 2)
        out[f"{mode}_{name}" + ("_fused" if impl == "pallas-fused" else "")] = r
    return out


def case_restore(tmp: str) -> dict:
    """jllm.load(mesh=...) of a jllm checkpoint and of an HF directory: shard shapes and values."""
    from jllm import hf
    from convert.tiny import make_tiny_hf
    out = {}
    cfg = GQA
    hf_dir = make_tiny_hf(os.path.join(tmp, "hf"), cfg, tokenizer=False)
    ckpt = os.path.join(tmp, "ckpt")
    hf.convert(hf_dir, ckpt, dtype="float32", progress=False)
    _, want, _ = hf.load_hf(hf_dir, "float32", progress=False)
    mesh = mesh_of(2, 4)
    for source, path in (("checkpoint", ckpt), ("hf", hf_dir)):
        model = jllm.load(path, "float32", mesh=mesh, progress=False)
        target = parallel.param_shardings(cfg, mesh)
        arrays = {}
        for name, arr in to_flat(model.params).items():
            arrays[name] = {
                "sharding_equal": arr.sharding == target[name],
                "shard_shapes": sorted({s.data.shape for s in arr.addressable_shards}),
                "expected_shape": target[name].shard_shape(arr.shape),
                "devices": len(arr.addressable_shards),
                "value_equal": bool(np.array_equal(np.asarray(arr), want[name])),
            }
        out[source] = arrays
    return out


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements) of every all-reduce / all-gather / all-to-all in compiled HLO text."""
    found = []
    for m in re.finditer(r"= \w+\[([\d,]*)\][^ ]* (all-reduce|all-gather|all-to-all)\(", hlo):
        dims = [int(d) for d in m.group(1).split(",") if d]
        found.append((m.group(2), int(np.prod(dims)) if dims else 1))
    return found


def case_hlo() -> dict:
    """Collectives in the compiled prefill/decode of the bfloat16 1 x 8 case (the same shapes as its
    generate call, so the compilations are reused), and whether they keep the cache's sharding;
    the same steps over an int8 cache ("int8_cache": its scale writes must add no collective)."""
    cfg, mesh, B, T, S = MHA, mesh_of(1, 8), len(PROMPTS), 16, 64
    bf16 = {name: jnp.asarray(w, jnp.bfloat16) for name, w in random_flat(cfg).items()}
    params = parallel.shard_params(from_flat(bf16, cfg), cfg, mesh)
    out = {"weight_elements": min(int(np.prod(w.shape)) for w in bf16.values() if w.ndim == 2)}
    kw = dict(cfg=cfg, plan=make_plan(cfg, mesh, "xla", "xla"))
    with parallel.mesh_context(mesh):
        host = (np.ones((B, T), np.int32), np.full((B,), 5, np.int32), Sampling.make(B), jax.random.key(0))
        tokens, n_tokens, sampling, key = parallel.put_batch(host, mesh)
        for tag, dtype in (("", jnp.bfloat16), ("int8_cache_", jnp.int8)):
            cache = parallel.init_cache(cfg, B, S, dtype, mesh)
            for name, fn, args, extra in (
                    ("prefill", prefill, (params, tokens, n_tokens, cache, sampling, key), {}),
                    ("decode", decode, (params, tokens[:, 0], cache, sampling, key), {"n_steps": 8})):
                compiled = fn.lower(*args, **kw, **extra).compile()
                cache_out = compiled.output_shardings[1]
                out[tag + name] = {"collectives": _collectives(compiled.as_text()),
                                   "cache_sharding_kept": all(a == b.sharding for a, b in zip(
                                       jax.tree.leaves(cache_out), jax.tree.leaves(cache)))}
    return out


def sharded(out_path: str) -> None:
    import tempfile
    assert jax.device_count() == 8, jax.devices()
    with tempfile.TemporaryDirectory() as tmp:
        results = {"models": {**case_float32(), **case_low_precision()}, "hlo": case_hlo(),
                   "pallas": case_pallas(), "pallas_matmul": case_pallas_matmul(),
                   "restore": case_restore(tmp)}
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def multihost(out_path: str, ckpt: str, prompts: str, coordinator: str, num_processes: str,
              process_id: str) -> None:
    index, count = parallel.initialize_distributed(coordinator, int(num_processes), int(process_id))
    assert (jax.local_device_count(), jax.device_count()) == (2, 2 * count), jax.devices()
    mesh = rules.make_mesh(tp=jax.device_count())  # one model axis across both processes
    model = jllm.load(ckpt, mesh=mesh, progress=False)
    wq = model.params.layers[0].wq
    results = [r.tokens for r in jllm.generate(model, json.loads(prompts), max_new_tokens=MAX_NEW,
                                                stop_token_ids=[])]
    said = parallel.broadcast_text("héllo, wörld" if index == 0 else None)  # chat's input path
    assert said == "héllo, wörld", said
    if index == 0:
        with open(out_path, "w") as f:
            json.dump({"tokens": results, "processes": count, "devices": jax.device_count(),
                       "wq_local_shards": sorted({s.data.shape for s in wq.addressable_shards}),
                       "wq_local_devices": len(wq.addressable_shards)}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    {"sharded": sharded, "multihost": multihost}[MODE](*sys.argv[2:])
