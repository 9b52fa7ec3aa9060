"""Pretrained checkpoints read into (and written back from) this codebase's own Flax models.

`hf` reads Hugging Face folders (config.json + safetensors + tokenizer.json) of BERT into
`research.models.bert`; `hf_gpt` those of GPT-2, Llama and Qwen2 into `research.models.gpt.GPT`
(and writes that GPT back as such a folder).
`gguf` reads llama.cpp's GGUF files (Llama family: SmolLM2) into `research.models.gpt.GPT`,
with the tokenizer and chat template stored in the file.
"""
