"""Serving: the inference engine, the rolling context, the conversation logic and Telegram."""
