"""Cold start from a chat history (Telegram, WhatsApp, ChatGPT, Messenger, Discord exports) or a character card.

`telegram`, `whatsapp`, `chatgpt`, `messenger` and `discord` only parse (an export → `chat.Parsed`:
who said what, when, and what was dropped and why; `sources` finds the files of an export that
is a folder or a zip, `limits` bounds what is read); `pipeline` turns that into training windows
the same way for all of them and stores them, so a format quirk can never change what the model
learns from. Entry point: `pipeline.import_chat(store, kind, path, me=...)`.

`card` reads a SillyTavern character card instead: a persona (written to a file) and a handful of
example replies, stored through the same Store.add_import. Entry point: `card.import_card(...)`.
"""
