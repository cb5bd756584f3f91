"""One file per eval; every score is deterministic for a given model and data.

All evals run the quantized GGUF — the artifact that would be served — through llama.cpp,
and its parent on the same items, so every score has a fair baseline.
"""
