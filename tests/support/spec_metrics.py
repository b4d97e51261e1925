"""The metric names of SPEC section 6: binding, and all a dashboard may use."""

SPEC_SECTION_6 = frozenset(
    {
        "streamgate_requests_total",
        "streamgate_time_to_first_chunk_seconds",
        "streamgate_chunk_gap_seconds",
        "streamgate_stream_duration_seconds",
        "streamgate_chunks_per_stream",
        "streamgate_stream_errors_total",
        "streamgate_client_disconnects_total",
        "streamgate_active_streams",
        "streamgate_concurrency_in_use",
        "streamgate_concurrency_capacity",
        "streamgate_concurrency_waiting",
        "streamgate_queue_wait_seconds",
        "streamgate_rate_limited_total",
        "streamgate_upstream_attempts_total",
        "streamgate_retries_total",
        "streamgate_endpoint_healthy",
        "streamgate_backpressure_stalls_total",
        "streamgate_worker_restarts_total",
        "streamgate_config_reloads_total",
    }
)

# Metrics beyond section 6 that the gateway exports, each documented in the
# README ("Metrics"); the dashboard and alerts may use them (SPEC section 6, last paragraph).
DOCUMENTED_ADDITIONS = frozenset(
    {
        "streamgate_tokens_total",
        "streamgate_output_tokens_per_second",
        "streamgate_shared_state_up",
        "streamgate_upstream_panic",
        "streamgate_endpoint_ejections_total",
        "streamgate_upstream_pool_wait_seconds",
        "streamgate_upstream_pool_exhausted_total",
        "streamgate_bad_requests_total",
        "streamgate_token_budget_reserved_tokens_total",
        "streamgate_token_budget_settled_tokens_total",
        "streamgate_token_budget_refused_total",
        "streamgate_active_websocket_sessions",
        "streamgate_websocket_sessions_total",
        "streamgate_websocket_messages_total",
        "streamgate_hedges_started_total",
        "streamgate_hedges_won_total",
        "streamgate_hedges_over_budget_total",
        "streamgate_resumes_total",
        "streamgate_process_restarts_total",
    }
)
