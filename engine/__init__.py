"""A model file and how to run it: the engine protocol, llama.cpp, per-chat KV states, the
inference worker, the chat template and GGUF reading."""
