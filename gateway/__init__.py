"""streamgate: an async streaming reverse proxy for LLM traffic."""
