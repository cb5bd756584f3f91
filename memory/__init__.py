"""SQLite: the schema, its migrations and the one store API everything else goes through."""

from memory.store import Store

__all__ = ["Store"]
