"""The HTTP/1.1 adapter: the server side (requests in, answers out) and the upstream client."""
