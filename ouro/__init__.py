"""Ouroboros: a Telegram persona bot that keeps learning from the people who talk to it.

This package is the application shell: the `ouro` CLI, the one user-facing error type,
the terminal chat and the benchmarks. The real work lives in bot/, memory/, trainer/,
evals/ and config/.
"""

__version__ = "0.1.0"
