"""Talking to LLMs: one OpenAI-compatible client (``client``) and the embedded offline server (``local_server``)."""
