"""Serving engines: what each can serve (`engines`) and the checkpoint dialect each reads (`dialects`)."""
