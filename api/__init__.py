"""The HTTP transport: an OpenAI-compatible API over serving's Conversation (and, later, the owner's page)."""
