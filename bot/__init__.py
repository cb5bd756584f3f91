"""Telegram only: the application, handlers, buttons, admin/review/privacy commands and streaming."""
