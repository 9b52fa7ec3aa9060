"""Pretrained checkpoints read into (and written back from) this codebase's own Flax models.

`hf` reads Hugging Face folders (config.json + safetensors + tokenizer.json): BERT so far.
"""
