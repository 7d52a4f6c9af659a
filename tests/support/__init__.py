"""Test helpers: tiny generated models (GGUF and Hugging Face checkpoints) and their numpy references."""

from edge_spade import EngineSettings

# f32 KV cache and no flash attention: llama.cpp then computes in f32 like the numpy reference.
EXACT = EngineSettings(n_ctx=256, kv_type="f32", flash_attn=False)
