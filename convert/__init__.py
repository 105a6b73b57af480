"""Checkpoint conversion: Hugging Face Llama directories into jllm checkpoints (`convert.hf`), and a
random tiny Llama in HF format for the quickstart and tests (`convert.tiny`)."""
