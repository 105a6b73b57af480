"""The engine on a tensor-parallel mesh, in a fresh process with 2 CPU devices (for test_engine.py).

    python tests/engine_tp_worker.py OUT.json

Greedy engine tokens on a 1 x 2 mesh (KV heads split, and replicated when fewer than tp) and
generate's on one device, for the same prompts, then sampled rows with penalties, and the step
programs compiled after start-up (the engine compiles them two at a time in threads), written as
JSON for the test to compare.
"""
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JLLM_CACHE_DIR"] = "off"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jllm  # noqa: E402
from conftest import random_flat  # noqa: E402
from jllm import parallel  # noqa: E402
from jllm.config import LlamaConfig  # noqa: E402
from jllm.engine import Engine, SamplingParams  # noqa: E402
from jllm.engine.step import engine_step  # noqa: E402
from jllm.generate import Model  # noqa: E402
from jllm.model import from_flat  # noqa: E402
from sharding import rules  # noqa: E402

SPLIT = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=128)
REPLICATED = dataclasses.replace(SPLIT, n_kv_heads=1)


def run(cfg: LlamaConfig) -> dict:
    params = from_flat({k: jnp.asarray(v) for k, v in random_flat(cfg).items()}, cfg)
    single = Model(params=params, cfg=cfg, attn_impl="xla", matmul_impl="xla")
    mesh = rules.make_mesh(2, 1, devices=jax.devices()[:2])
    sharded = dataclasses.replace(single, params=parallel.shard_params(params, cfg, mesh), mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(1, 40, 10)]
    sp = SamplingParams(max_tokens=8, stop_token_ids=())
    engine = Engine(sharded, max_seqs=4, page_size=4, num_pages=40, max_tokens_per_step=16, chunk_row=8,
                    progress=False, compile_workers=2)  # compiled ahead in threads, each in the mesh
    compiled = engine_step._cache_size()
    got = [o.token_ids for o in engine.generate(prompts, sp)]
    want = [jllm.generate(single, [p], max_new_tokens=8, stop_token_ids=[])[0].tokens for p in prompts]
    # Sampled rows with penalties: generate's tokens with the same seed and penalties.
    pen = [SamplingParams(max_tokens=8, temperature=1.0, seed=i, frequency_penalty=1.0, presence_penalty=0.5,
                          stop_token_ids=()) for i in range(4)]
    got_pen = [o.token_ids for o in engine.generate(prompts[:4], pen)]
    want_pen = [jllm.generate(single, [p], max_new_tokens=8, temperature=1.0, seed=s.seed, stop_token_ids=[],
                              frequency_penalty=1.0, presence_penalty=0.5)[0].tokens for p, s in zip(prompts, pen)]
    # A guided row's bias (what Engine._set_bias_rows writes before a step; a stub grammar that
    # allows only token 7) keeps the state's sharding, so the next steps compile nothing, and the
    # greedy rows beside it are unchanged.
    bias_sharding = engine.state.bias.sharding

    class _Allow7:
        @staticmethod
        def words():
            words = np.zeros(-(-cfg.vocab_size // 32), np.uint32)
            words[0] = 1 << 7
            return words

    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=3, temperature=1.0, seed=1, stop_token_ids=()))
    req = engine.requests[rid]
    engine.step()   # admitted: it holds a slot
    stub = type("R", (), dict(slot=req.slot, params=req.params, matcher=_Allow7()))()
    engine._set_bias_rows([stub])
    bias_kept = engine.state.bias.sharding == bias_sharding
    guided_tokens = []
    while engine.has_unfinished():
        guided_tokens += [t for o in engine.step() if o.request_id == rid for t in o.token_ids]
    got_after = [o.token_ids for o in engine.generate(prompts[:2], sp)]
    pages = engine.state.k_pages[0]
    return dict(got=got, want=want, got_pen=got_pen, want_pen=want_pen, kv_replicated=sharded.plan.kv_replicated,
                page_shards=[list(s.data.shape) for s in pages.addressable_shards],
                preemptions=engine.stats().preemptions, compiled_later=engine_step._cache_size() - compiled,
                bias_kept=bool(bias_kept), got_after=got_after, guided_tokens=guided_tokens)


if __name__ == "__main__":
    out = {"split": run(SPLIT), "replicated": run(REPLICATED)}
    tmp = sys.argv[1] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, sys.argv[1])
