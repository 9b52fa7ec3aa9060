"""Pretrained checkpoints read into (and written back from) this codebase's own Flax models.

`hf` reads Hugging Face folders (config.json + safetensors + tokenizer.json): BERT so far.
`gguf` reads llama.cpp's GGUF files (Llama family: SmolLM2) into `research.models.gpt.GPT`,
with the tokenizer and chat template stored in the file.
"""
