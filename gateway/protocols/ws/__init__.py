"""WebSocket sessions: the engine's Inbound and Sink over an aiohttp WebSocketResponse (server
side), and an UpstreamClient that opens WebSockets to an upstream (client side)."""
