"""Cold start from a person's chat history: Telegram Desktop JSON and WhatsApp TXT exports.

`telegram` and `whatsapp` only parse (a file → `chat.Parsed`: who said what, when, and what
was dropped and why); `pipeline` turns that into training windows the same way for both and
stores them, so a format quirk can never change what the model learns from.
Entry point: `pipeline.import_chat(store, kind, path, me=...)`.
"""
