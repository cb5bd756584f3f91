"""Generations on disk: folders, the ACTIVE pointer, the ledger, promote/rollback, fallback,
the chart and the Ollama Modelfile."""
