"""Upstreams: pools of endpoints, balancing, outlier ejection, health, the worker supervisor."""
