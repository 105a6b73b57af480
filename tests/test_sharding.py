"""Sharding: the rules table, the KV-head decision, and sharded runs equal to unsharded ones.

The sharded runs need 8 CPU devices, which must be set before jax starts; this process has already
started it with one. So one subprocess (tests/sharding_worker.py) runs every sharded case, on
meshes 1x8, 2x4 and 8x1 (dp x tp), and pickles what it saw; the tests below assert on it.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from jllm import parallel
from jllm.config import LlamaConfig
from jllm.quant import QArray
from sharding import rules

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_worker.py")
# kvint8: float32 weights over an int8 cache; a code may round the other way on another layout.
LOGIT_ATOL = {"float32": 1e-4, "bfloat16": 0.1, "int8": 0.1, "int4": 0.1, "kvint8": 1e-3}


def _abstract_mesh(dp: int, tp: int) -> AbstractMesh:
    return AbstractMesh((dp, tp), rules.MESH_AXES, axis_types=(AxisType.Auto,) * 2)


# --- rules (no devices needed) -------------------------------------------------------------------

def test_logical_axes_map_through_the_rules():
    assert rules.logical_to_spec(("embed", "heads")) == P(None, "model")
    assert rules.logical_to_spec(("ffn", "embed")) == P("model", None)
    assert rules.logical_to_spec(("batch", "seq", "kv_heads", "head_dim")) == P("data", None, "model", None)
    assert rules.logical_to_spec(("vocab", "embed")) == P("model", None)


def test_two_logical_axes_on_one_mesh_axis_are_refused():
    with pytest.raises(ValueError, match="two dimensions on one mesh axis"):
        rules.logical_to_spec(("heads", "ffn"))


def test_unknown_logical_axis_is_refused():
    with pytest.raises(ValueError, match="'experts' has no rule"):
        rules.logical_to_spec(("embed", "experts"))


@pytest.mark.parametrize("tp, dp", [(2, 1), (1, 2), (0, 1), (1, -1)])
def test_make_mesh_refuses_sizes_that_do_not_match_the_devices(tp, dp):
    with pytest.raises(ValueError, match=r"tp \* dp|must be a positive int"):
        rules.make_mesh(tp, dp)  # this process has one device


def test_make_mesh_of_one_device_has_both_axes():
    mesh = rules.make_mesh(1)
    assert mesh.axis_names == rules.MESH_AXES and mesh.size == 1


@pytest.mark.parametrize("n_kv_heads, tp, split", [(8, 8, True), (8, 2, True), (8, 16, False),
                                                   (2, 4, False), (1, 8, False)])
def test_kv_heads_split_when_there_are_enough_and_replicate_otherwise(n_kv_heads, tp, split):
    rl = rules.kv_heads_rule(64, n_kv_heads, tp)
    assert (rl["kv_heads"] == "model") == split
    assert rl["heads"] == "model"  # query heads always split


@pytest.mark.parametrize("n_heads, n_kv_heads, tp, match", [
    (8, 8, 3, "n_heads=8 is not divisible by tp=3"),
    (24, 6, 4, "n_kv_heads=6 is not divisible by tp=4"),
    (24, 3, 8, "tp=8 is not a multiple of n_kv_heads=3")])
def test_kv_heads_rule_refuses_uneven_splits(n_heads, n_kv_heads, tp, match):
    with pytest.raises(ValueError, match=match):
        rules.kv_heads_rule(n_heads, n_kv_heads, tp)


def test_llama_2_70b_is_megatron_sharded():
    cfg = LlamaConfig.from_name("llama-2-70b")
    specs = {n: s.spec for n, s in parallel.param_shardings(cfg, _abstract_mesh(1, 8)).items()}
    assert specs["layers.0.wq"] == specs["layers.0.w1"] == specs["layers.0.w3"] == P(None, "model")
    assert specs["layers.0.wk"] == specs["layers.0.wv"] == P(None, "model")  # 8 KV heads on tp=8
    assert specs["layers.0.wo"] == specs["layers.0.w2"] == P("model")       # row-parallel
    assert specs["tok_embeddings"] == P("model") and specs["output"] == P(None, "model")
    assert specs["norm"] == specs["layers.0.attention_norm"] == P()
    on_16 = parallel.param_shardings(cfg, _abstract_mesh(1, 16))
    assert on_16["layers.0.wk"].spec == P() and on_16["layers.0.wq"].spec == P(None, "model")
    cache = parallel.cache_shardings(cfg, _abstract_mesh(2, 16))
    assert cache.k[0].spec == P("data") and cache.lengths.spec == P("data")
    assert cache.k_scale is None
    int8 = parallel.cache_shardings(cfg, _abstract_mesh(1, 8), quantized=True)
    assert int8.k[0].spec == P(None, None, "model")  # [B, S, G, K]: the 8 KV heads split
    assert int8.k_scale[0].spec == int8.v_scale[-1].spec == P(None, "model")  # [B, G, S]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_shard_like_the_weight_they_replace(mode):
    cfg = LlamaConfig.from_name("llama-2-70b")
    sh = parallel.param_shardings(cfg, _abstract_mesh(1, 8), quant=mode)
    wq, wo = sh["layers.0.wq"], sh["layers.0.wo"]
    assert isinstance(wq, QArray) and wq.bits == int(mode[3:])
    assert wq.q.spec == wq.scale.spec == P(None, "model")  # column-parallel: scales follow the output
    assert wo.q.spec == P("model")  # row-parallel
    # Per-channel int8 has one scale row for all inputs; int4 groups (64 of 128 rows) split with q.
    assert wo.scale.spec == (P() if mode == "int8" else P("model"))
    assert not isinstance(sh["tok_embeddings"], QArray)


def test_split_dimensions_must_divide():
    cfg = LlamaConfig.from_name("tiny", ffn_dim=178)  # 178 ffn units do not split 4 ways
    with pytest.raises(ValueError, match="layers.0.w1: dimension 178"):
        parallel.param_shardings(cfg, _abstract_mesh(1, 4))


# --- sharded runs on 8 CPU devices ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "results.pkl"
    env = {**os.environ, "JLLM_CACHE_DIR": "off", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, WORKER, "sharded", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(f"{WORKER} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    with open(out, "rb") as f:
        return pickle.load(f)


CASES = ["float32_dp=1_tp=8", "float32_dp=2_tp=4", "float32_dp=8_tp=1", "float32_gqa_kv2_dp=2_tp=4",
         "bfloat16_dp=1_tp=8", "int8_dp=2_tp=4", "int4_dp=2_tp=4", "kvint8_dp=2_tp=4",
         "kvint8_gqa_pallas_dp=1_tp=4"]


@pytest.mark.parametrize("case", CASES)
def test_sharded_model_matches_unsharded(sharded, case):
    ref, got = sharded["models"][case]["ref"], sharded["models"][case]["sharded"]
    assert got["tokens"] == ref["tokens"]  # greedy generate; None where only logits were compared
    want = ref["logits"].astype(np.float32)
    np.testing.assert_allclose(got["logits"].astype(np.float32), want, rtol=0,
                               atol=LOGIT_ATOL[case.split("_")[0]])


@pytest.mark.parametrize("case", ["decode_kv_split_dp=2_tp=4", "prefill_kv_replicated_dp=1_tp=4"])
def test_pallas_attention_per_shard_matches_xla(sharded, case):
    r = sharded["pallas"][case]
    np.testing.assert_allclose(r["got"], r["want"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["int8_mha", "int8_gqa_kv2", "int4_mha", "int4_gqa_kv2",
                                  "int8_gqa_kv2_fused", "int4_mha_fused", "bf16_gqa_kv2_fused",
                                  "bf16_mha_fused"])
def test_quantized_pallas_matmul_per_shard_matches_one_device(sharded, case):
    r = sharded["pallas_matmul"][case]
    assert r["kernel_in_hlo"]  # the sharded decode step runs the kernel, not XLA's matmul
    # q/k/v (x3) and gate/up (x2) each one launch per shard with "pallas-fused"; none without.
    assert r["fused_kernels_in_hlo"] == (["x2", "x3"] if case.endswith("_fused") else [])
    assert r["sharded"] == r["ref"]  # greedy, batch 1: the kernel's M = 1 path on every shard
    gathered = [n for op, n in r["collectives"] if op == "all-gather"]
    assert max(gathered, default=0) < r["weight_elements"], r["collectives"]  # no weight gathered
    assert any(op == "all-reduce" for op, _ in r["collectives"])  # row-parallel partial sums


@pytest.mark.parametrize("source", ["checkpoint", "hf"])
def test_sharded_load_puts_only_its_shard_on_each_device(sharded, source):
    arrays = sharded["restore"][source]
    assert len(arrays) == 2 * 9 + 3
    for name, a in arrays.items():
        assert a["sharding_equal"], name
        assert a["devices"] == 8 and a["shard_shapes"] == [a["expected_shape"]], (name, a)
        assert a["value_equal"], name
    # GQA 2 KV heads on tp=4: wk is replicated over model, wq split 4 ways.
    assert arrays["layers.0.wq"]["expected_shape"] == (128, 32)
    assert arrays["layers.0.wk"]["expected_shape"] == (128, 32)  # G * K = 32: whole
    assert arrays["layers.0.wo"]["expected_shape"] == (32, 128)


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_compiled_step_all_reduces_activations_and_gathers_no_weight(sharded, step):
    hlo = sharded["hlo"]
    ops = hlo[step]["collectives"]
    gathered = [n for op, n in ops if op == "all-gather"]
    assert max(gathered, default=0) < hlo["weight_elements"], ops  # logits and top-k rows only
    assert sum(op == "all-reduce" for op, _ in ops) >= 2 * 2, ops  # wo and w2 of each layer


@pytest.mark.parametrize("step", ["prefill", "decode", "int8_cache_prefill", "int8_cache_decode"])
def test_donated_cache_keeps_its_sharding(sharded, step):
    assert sharded["hlo"][step]["cache_sharding_kept"]


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_int8_cache_adds_no_collective(sharded, step):
    """Writing the codes and the [B, G, S] scales of KV heads split over model stays per shard."""
    hlo = sharded["hlo"]
    assert sorted(hlo["int8_cache_" + step]["collectives"]) == sorted(hlo[step]["collectives"])


_NO_CACHE_GATHER = r'''
import os, sys
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
from jllm import parallel
from jllm.config import LlamaConfig
from jllm.generate import decode
from jllm.plan import make_plan
from jllm.sampling import Sampling
from sharding import rules
cfg = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=256, vocab_size=512,
                  max_seq_len=256)
mesh = rules.make_mesh(4, 2)
params = parallel.random_params(cfg, mesh, jax.random.key(0), "float32")
with parallel.mesh_context(mesh):
    cache = parallel.init_cache(cfg, 2, 128, jnp.float32, mesh)
    tok, samp, key = parallel.put_batch(
        (jnp.zeros((2,), jnp.int32), Sampling.make(2), jax.random.key(0)), mesh)
    text = decode.lower(params, tok, cache, samp, key, cfg=cfg, n_steps=4,
                        plan=make_plan(cfg, mesh, "xla", "xla")).compile().as_text()
print(sum("all-gather(" in line and "128," in line.split("=")[1].split("(")[0]
          for line in text.splitlines() if "=" in line))
'''


def test_xla_attention_with_replicated_kv_heads_never_gathers_the_cache():
    # GQA with 2 KV heads on tp=4 replicates the cache; attention must read it where it lies.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JLLM_CACHE_DIR": "off",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", _NO_CACHE_GATHER], env=env, capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_sharded_int8_cache_run_reads_int8_codes(sharded):
    """kvint8_dp=2_tp=4 has the weights of float32_dp=2_tp=4: its logits must differ from the
    float cache's (so the int8 cache was used), but only by rounding."""
    models = sharded["models"]
    int8, f32 = models["kvint8_dp=2_tp=4"]["sharded"]["logits"], models["float32_dp=2_tp=4"]["sharded"]["logits"]
    rel = np.linalg.norm(int8 - f32) / np.linalg.norm(f32)
    assert 0 < rel < 0.05, rel
