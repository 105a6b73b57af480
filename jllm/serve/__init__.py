"""`jllm serve`: an OpenAI-compatible HTTP server on the engine (needs the [serve] extra).

    runner = EngineRunner(Engine(model, ...))
    app = create_app(runner, "llama-2-7b", cfg=model.cfg, tokenizer=model.tokenizer)
    serve(app, "127.0.0.1", 8000)
"""
