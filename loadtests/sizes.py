"""How big each scenario is: the standard set (`make bench`, under ten minutes) and --quick.

Every load is bounded twice: by a count (streams, tries, requests) and by `timeout_s` on
top of it, so a stuck proxy fails the run instead of hanging it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # 0. load generator ceiling: unpaced streams straight to fake-llm
    ceiling_streams: int = 600
    ceiling_tokens: int = 256
    ceiling_concurrency: int = 64
    # 1. time to first chunk, per level: (concurrency, streams, tokens, tokens/s); the streams
    # split in interleaved rounds. At 64, streams of 16 tokens at 50/s: ≈200 new streams/s
    # and 3,200 chunks/s, a steady load well inside what every target can take.
    ttfc_levels: tuple[tuple[int, int, int, float], ...] = ((1, 300, 8, 400.0),
                                                            (64, 1500, 16, 50.0))
    ttfc_rounds: int = 3
    # 2. CPU per relayed chunk at a paced load
    paced_streams: int = 512
    paced_chunks: int = 64
    paced_interval_s: float = 0.02
    paced_repeats: int = 3  # streams per connection, back to back, per round
    paced_rounds: int = 3
    # 3. streams per second, no upstream delay (wrk)
    rate_levels: tuple[int, ...] = (64, 512)
    rate_duration_s: float = 6.0
    rate_tokens: int = 16
    scale_rounds: int = 3  # 1 vs 2 gateway processes, in turns; the median round of each
    scale_duration_s: float = 3.0
    # 4. memory per open stream
    memory_levels: tuple[int, ...] = (1000, 5000)
    memory_warmup_streams: int = 500
    # 5. client disconnect -> upstream close
    disconnect_tries: int = 50
    # 6. routing cost
    routing_levels: tuple[int, ...] = (10, 1000)
    routing_requests: int = 6000
    routing_concurrency: int = 16
    routing_match_calls: int = 20000
    # 7. chaos: per-request upstream faults x client behaviours (tests/support/chaos.py)
    chaos_requests: int = 2400
    chaos_concurrency: int = 200
    # 8. WebSocket beside SSE: CPU per relayed message, and disconnect -> upstream close
    ws_sessions: int = 256  # concurrent sessions (and SSE streams), each `ws_repeats` answers
    ws_tokens: int = 64
    ws_interval_s: float = 0.02
    ws_repeats: int = 3
    ws_rounds: int = 3
    ws_disconnect_tries: int = 30
    # 9. gRPC beside SSE: paced streams through one gateway, then cancels one at a time
    grpc_streams: int = 128
    grpc_messages: int = 64
    grpc_interval_s: float = 0.02
    grpc_cancel_tries: int = 30
    # every load phase
    timeout_s: float = 120.0
    quiet_wait_s: float = 30.0  # before each scenario, wait up to this long for a quiet machine


STANDARD = Sizes()

QUICK = Sizes(
    chaos_requests=400,
    chaos_concurrency=50,
    ceiling_streams=60,
    ceiling_tokens=64,
    ttfc_levels=((1, 40, 8, 400.0), (64, 192, 16, 50.0)),
    ttfc_rounds=2,
    paced_streams=64,
    paced_chunks=16,
    paced_repeats=4,
    paced_rounds=1,
    rate_levels=(64,),
    rate_duration_s=1.0,
    scale_rounds=1,
    scale_duration_s=1.0,
    memory_levels=(200,),
    memory_warmup_streams=50,
    disconnect_tries=5,
    grpc_streams=32,
    grpc_messages=16,
    grpc_cancel_tries=5,
    routing_levels=(10, 100),
    routing_requests=300,
    routing_match_calls=2000,
    ws_sessions=32,
    ws_tokens=16,
    ws_repeats=2,
    ws_rounds=1,
    ws_disconnect_tries=5,
    timeout_s=30.0,
    quiet_wait_s=0.0,
)
