"""Admission: rate limits, then weighted concurrency; in memory or shared through Redis."""
