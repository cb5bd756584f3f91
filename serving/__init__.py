"""A conversation without any transport: context, a turn's life, hot-swap, the learning loop,
status and the runtime wiring. Telegram, the terminal, an API and a web page sit on top."""
