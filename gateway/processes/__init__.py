"""`streamgate serve`: one gateway, or a supervisor of `server.workers` serving processes."""
