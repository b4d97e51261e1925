"""Observation: Prometheus metrics, OpenTelemetry traces, the access log."""
