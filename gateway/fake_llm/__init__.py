"""`streamgate fake-llm`: the bundled reference worker.

An OpenAI-compatible server that streams deterministic tokens at a configurable pace and
fails on demand, so that the gateway's timeouts, retries, commit point and disconnect
handling can be driven for real: by the demo, the worker-pool example, tests and load tests.

Behaviour worth knowing when writing tests against it:

- The token text depends only on the request's `model` and `messages` (or `prompt`), and
  `seed` (0 by default); the first k tokens are the same whatever the token count, stream
  flag or other knobs.
- Chat streams send the role-only delta at once, together with the headers; `ttft` is the
  wait before the first *content* token. `/v1/completions` streams have no such preamble.
- `stall_after N` / `reset_after N` count content tokens: N tokens, then silence until the
  client leaves, or a TCP RST. N == 0 fails before the first content token; N >= tokens never
  fires. For unary requests N == 0 fails before any byte is sent, N > 0 after the headers and
  half of the body (a truncated body, as a crashed backend would leave it). `cut_after N`
  ends the stream cleanly after N content tokens, with no finish_reason and no [DONE].
- A chat request whose last message is the assistant's (a prefill) is continued: only the
  rest of the answer that text begins is sent (`prefill: continue`), as vLLM does with
  `continue_final_message`; or refused with a 400 (`prefill: refuse`).
- `fail_status` answers at once, with an OpenAI-style error body and `Retry-After` when asked.
- A request's JSON may override every knob: `"fake": {"ttft": 0.5, "tokens": 20, ...}`.
- `max_tokens` caps the token count (finish_reason `length`), as a real backend does.
- The same paths upgrade to WebSockets (Inferneo style, `websocket`): a JSON request per
  message, answered with the same chunks, one per message, ending at the one with
  `finish_reason` (no `[DONE]`); the same knobs, a flag's `fail_status` refusing the upgrade.

Built for load tests: every byte of an event except the token is encoded once per request,
and each event goes out as its own HTTP chunk, with no per-chunk logging or bookkeeping.

The modules, bottom up: `knobs` (what a completion does), `completion` (its tokens and
encodings), `stats`, `faults` (error answers, stalls, resets), `generate` (the completion
endpoints), `websocket` (the same over WebSocket), `app` (routes and the other endpoints),
`cli` (flags, serve, main).
"""

from .app import MODEL, build_app
from .cli import main, serve
from .completion import CHAT, TEXT, VOCAB, Completion, Dialect
from .faults import error_response
from .generate import KNOBS, STATS
from .knobs import Knobs
from .stats import Stats

__all__ = [
    "CHAT",
    "KNOBS",
    "MODEL",
    "STATS",
    "TEXT",
    "VOCAB",
    "Completion",
    "Dialect",
    "Knobs",
    "Stats",
    "build_app",
    "error_response",
    "main",
    "serve",
]
