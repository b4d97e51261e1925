"""The gRPC adapter: a gRPC listener, gRPC upstreams, and an HTTP bridge to gRPC methods."""
