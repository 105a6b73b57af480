"""Continuous batching over the paged KV cache (docs/ENGINE.md).

    engine = Engine(jllm.load(path), max_seqs=64)
    rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.text, end="")
"""
from jllm.engine.api import EngineStats, QueueFull, RequestMetrics, RequestOutput, SamplingParams
from jllm.engine.engine import Engine

__all__ = ["Engine", "EngineStats", "QueueFull", "RequestMetrics", "RequestOutput", "SamplingParams"]
