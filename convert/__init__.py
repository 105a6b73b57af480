"""Hugging Face-side tools: `convert.tiny` writes a small random-weight Llama in Hugging Face
format (with a SentencePiece tokenizer trained on local text) for the quickstart and the tests.

Reading Hugging Face checkpoints and converting them into jllm checkpoints is `jllm.hf`
(`jllm convert`, `jllm.load(hf_dir)`).
"""
