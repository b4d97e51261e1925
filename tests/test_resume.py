"""Resuming a chat completion stream that broke mid-answer (route `resume:`), over real sockets.

The backends are fake-llm in each role (an answer cut, stalled or reset after N tokens; a
fallback that continues a prefill, refuses it, or answers differently) or a scripted upstream
where a test needs every byte. What the client reads is compared with fake-llm's canonical
answer: the whole text exactly once, under one id, or a visible error, never two answers
spliced together.
"""

from __future__ import annotations

import json

import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace as otel
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.config.loader import load_config_text
from gateway.engine.routing import RequestFacts
from gateway.errors import ConfigErrors
from gateway.explain import explain_lines
from gateway.observe.tracing import Tracing
from tests.conftest import config_yaml
from tests.support.fake_llm_server import answer, fake_llm
from tests.support.held import metric, nothing_held
from tests.support.scripted_upstream import (
    Respond,
    ScriptedUpstream,
    chat_chunk,
    content,
    done,
    finish,
    role_delta,
    sse_data,
)

MESSAGES = [{"role": "user", "content": "resume me"}]
BODY = {"model": "m", "messages": MESSAGES}
TEXT = answer(BODY)
LIMITS = "limits:\n  concurrency:\n    slots: {capacity: 10, weights: {stream: 3, unary: 1}}\n"
# chunk_gap is what ends the stalled stream; generous, so a loaded machine never trips it
FAST = "retry: {attempts: 1}\ntimeouts: {chunk_gap: 1s, first_chunk: 5s}\nlimits: [slots]\n"


def _config(primary: str, fallback: str, resume: str = "resume: {}\n", prefill: str = "assistant"):
    return config_yaml(
        primary,
        route=FAST + resume + "fallbacks: [backup]\n",
        top=LIMITS,
        extra_upstreams=(
            f'backup: {{kind: http, endpoints: [{{url: "{fallback}"}}], prefill: {prefill}}}\n'
        ),
    )


async def _openai_stream(gw, **extra) -> tuple[str, list]:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, **extra
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


async def _raw_stream(client, gw) -> tuple[int, bytes]:
    body = {**BODY, "stream": True}
    async with client.post(gw.url + "/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.read()


def _text_of(raw: bytes) -> str:
    text = ""
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in json.loads(event[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def _first_tokens(n: int) -> str:
    """The first `n` tokens of the canonical answer (each of fake-llm's words ends in a space)."""
    return "".join(word + " " for word in TEXT.split(" ")[:n])


BREAKS = [
    pytest.param({"cut_after": 5}, "cut", id="cut"),
    pytest.param({"stall_after": 5}, "chunk_gap_timeout", id="stall"),
    pytest.param({"reset_after": 5}, "reset", id="reset"),
]


@pytest.mark.parametrize("fault, reason", BREAKS)
async def test_a_broken_answer_is_continued_on_the_fallback_exactly_once(
    start_gateway, fault, reason
):
    async with fake_llm(**fault) as broken, fake_llm() as fallback:
        gw = await start_gateway(_config(broken.url, fallback.url))
        text, chunks = await _openai_stream(gw, stream_options={"include_usage": True})

        assert text == TEXT  # every token once: none lost, none repeated
        assert len({c.id for c in chunks}) == 1  # the continuation's own id is rewritten
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        # usage is the finishing upstream's: the continuation's 11 tokens, not the 5 before
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16 - 5
        assert fallback.stats.streams_completed == 1
        if reason != "reset":  # a stalled or cut backend's request is closed, not left open
            await broken.wait_until(lambda s: s.client_gone + s.cuts_injected == 1, 1, "close")
        labels = {"route": "r", "reason": reason, "result": "continued"}
        assert metric(gw, "streamgate_resumes_total", **labels) == 1
        await nothing_held(gw)


@pytest.mark.parametrize(
    "prefill, fallback_knobs, tries",
    [
        pytest.param(
            "assistant",
            {"prefill": "refuse"},
            [("up", "first", None, "cut"), ("backup", "resume", "cut", "400"),
             ("backup", "splice", "prefill_refused", "ok")],
            id="prefill-refused",
        ),
        pytest.param(
            "none", {}, [("up", "first", None, "cut"), ("backup", "resume", "cut", "ok")],
            id="no-prefill",
        ),
    ],
)
async def test_an_answer_asked_again_is_spliced_past_the_text_sent(
    start_gateway, capsys, prefill, fallback_knobs, tries
):
    async with fake_llm(cut_after=6) as broken, fake_llm(**fallback_knobs) as fallback:
        cfg = _config(broken.url, fallback.url, prefill=prefill)
        gw = await start_gateway(cfg.replace("telemetry: {access_log: off}\n", ""))
        text, chunks = await _openai_stream(gw)
        await nothing_held(gw)

    assert text == TEXT and len({c.id for c in chunks}) == 1
    assert metric(gw, "streamgate_resumes_total", route="r", reason="cut", result="spliced") == 1
    (record,) = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x[:1] == "{"]
    assert [(t["upstream"], t["why"], t["reason"], t["result"]) for t in record["tries"]] == tries
    assert (record["resumes"], record["upstream"], record["outcome"]) == (1, "backup", "completed")


async def test_a_splice_cuts_a_token_that_straddles_the_text_sent(start_gateway, client):
    first = TEXT[:13]  # "...", cut inside a token, in chunks of its own
    primary = Respond(sse=True, chunks=[role_delta(), content(first[:4]), content(first[4:])])
    async with ScriptedUpstream() as up, fake_llm() as fallback:
        up.script(primary)
        gw = await start_gateway(_config(up.url, fallback.url, prefill="none"))
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)
    assert status == 200 and _text_of(raw) == TEXT
    assert raw.endswith(b"data: [DONE]\n\n")
    ids = {json.loads(e[6:])["id"] for e in raw.split(b"\n\n") if e.startswith(b"data: {")}
    assert ids == {"chatcmpl-scripted"}


async def test_a_prefill_is_continued_from_inside_a_token(start_gateway):
    first = TEXT[:13]
    primary = Respond(sse=True, chunks=[role_delta(), content(first)])
    async with ScriptedUpstream() as up, fake_llm() as fallback:
        up.script(primary)
        gw = await start_gateway(_config(up.url, fallback.url, prefill="vllm"))
        text, _ = await _openai_stream(gw)
        await nothing_held(gw)
    assert text == TEXT


async def test_with_no_other_backend_the_same_one_continues_while_attempts_allow(
    start_gateway, client
):
    async with ScriptedUpstream() as only:
        only.script(
            Respond(sse=True, chunks=[role_delta(), content(TEXT[:9])]),  # cut
            Respond(sse=True, chunks=[role_delta(), content(TEXT[9:]), finish(), done()]),
        )
        cfg = config_yaml(
            only.url,
            route="retry: {attempts: 2}\nresume: {}\nlimits: [slots]\n",
            top=LIMITS,
            upstream="prefill: assistant\n",
        )
        gw = await start_gateway(cfg)
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)
        assert len(only.requests) == 2
    assert status == 200 and _text_of(raw) == TEXT and raw.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("prefill", ["none", "assistant", "vllm"])
async def test_the_continuation_request_speaks_the_upstreams_prefill_dialect(
    start_gateway, client, prefill
):
    sent = TEXT[:10]
    async with ScriptedUpstream() as up, ScriptedUpstream() as backup:
        up.script(Respond(sse=True, chunks=[role_delta(), content(sent)]))
        rest = TEXT if prefill == "none" else TEXT[10:]  # a whole answer again, or the rest
        backup.script(Respond(sse=True, chunks=[role_delta(), content(rest)]))
        gw = await start_gateway(_config(up.url, backup.url, prefill=prefill))
        status, raw = await _raw_stream(client, gw)
        (asked,) = [r.json() for r in backup.requests]
    assert status == 200 and _text_of(raw) == TEXT
    if prefill == "none":  # asked again as the client asked; spliced past `sent`
        assert asked == {**BODY, "stream": True}
        return
    assert asked["messages"] == [*MESSAGES, {"role": "assistant", "content": sent}]
    vllm = {"continue_final_message": True, "add_generation_prompt": False}
    assert {k: asked.get(k) for k in vllm} == (
        vllm if prefill == "vllm" else dict.fromkeys(vllm)
    )


async def test_a_different_answer_is_never_spliced_on(start_gateway, client):
    async with fake_llm(cut_after=5) as broken, fake_llm(seed=7) as other:
        gw = await start_gateway(_config(broken.url, other.url, prefill="none"))
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)

    assert status == 200
    head, sep, last = raw.rpartition(b"event: error\n")
    assert sep and b"[DONE]" not in raw
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "resume_diverged"
    assert _text_of(head) == _first_tokens(5)
    labels = {"route": "r", "kind": "resume_diverged"}
    assert metric(gw, "streamgate_stream_errors_total", **labels) == 1


async def test_an_answer_that_ends_before_the_text_sent_is_never_spliced_on(
    start_gateway, client
):
    shorter = [role_delta(), content(TEXT[:8]), finish(), done()]
    async with fake_llm(cut_after=5) as broken, ScriptedUpstream() as backup:
        backup.script(Respond(sse=True, chunks=shorter))
        gw = await start_gateway(_config(broken.url, backup.url, prefill="none"))
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)
    assert status == 200 and b"[DONE]" not in raw
    assert _text_of(raw.rpartition(b"event: error\n")[0]) == _first_tokens(5)
    assert b"resume_diverged" in raw


async def test_an_answer_longer_than_max_prefix_bytes_is_not_resumed(start_gateway, client):
    async with fake_llm(cut_after=5) as broken, fake_llm() as fallback:
        cfg = _config(broken.url, fallback.url, resume="resume: {max_prefix_bytes: 10}\n")
        gw = await start_gateway(cfg)
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)
    assert status == 200 and fallback.stats.completions_started == 0
    assert _text_of(raw) == _first_tokens(5) and b"[DONE]" not in raw


async def test_a_stream_of_tool_calls_is_not_resumed(start_gateway, client):
    call = {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}]}
    cut = [role_delta(), content("let me check "), sse_data(chat_chunk(call))]
    async with ScriptedUpstream() as up, fake_llm() as fallback:
        up.script(Respond(sse=True, chunks=cut))
        gw = await start_gateway(_config(up.url, fallback.url))
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)
    assert status == 200 and raw == b"".join(cut)  # relayed as sent, as without resume
    assert fallback.stats.completions_started == 0


@pytest.mark.parametrize(
    "fault, ending",
    [
        pytest.param({"cut_after": 5}, "clean", id="cut-relayed-as-sent"),
        pytest.param({"reset_after": 5}, "error", id="reset-ends-with-an-error-event"),
    ],
)
async def test_without_resume_a_broken_stream_ends_as_it_always_did(
    start_gateway, client, fault, ending
):
    async with fake_llm(**fault) as broken, fake_llm() as fallback:
        gw = await start_gateway(_config(broken.url, fallback.url, resume=""))
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)
    assert status == 200 and fallback.stats.completions_started == 0
    assert b"[DONE]" not in raw and _text_of(raw) == _first_tokens(5)
    assert (b"event: error" in raw) is (ending == "error")


async def test_resumes_are_bounded_per_request(start_gateway, client):
    async with fake_llm(cut_after=3) as one, fake_llm(cut_after=2) as two:
        cfg = _config(one.url, two.url, resume="resume: {max: 1}\n")
        gw = await start_gateway(cfg)
        status, raw = await _raw_stream(client, gw)
        await nothing_held(gw)
    # one resume, itself cut: the stream ends as sent, three tokens and two more
    assert status == 200 and b"[DONE]" not in raw and b"event: error" not in raw
    assert _text_of(raw) == _first_tokens(5)


async def test_a_client_that_leaves_during_a_resume_closes_every_try(start_gateway):
    async with fake_llm(cut_after=3) as broken, fake_llm(ttft=20) as slow:
        gw = await start_gateway(_config(broken.url, slow.url))
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        reader = aiter(stream)
        while not ((await anext(reader)).choices[0].delta.content):
            pass  # the client has its first token; the broken backend is cut after three
        await slow.wait_until(lambda s: s.completions_started == 1, 2, "the resume")
        await stream.close()  # the client goes away while the continuation is awaited
        await client.close()
        await slow.wait_until(lambda s: s.client_gone == 1, 1, "close of the resume")
        await nothing_held(gw)
        assert metric(gw, "streamgate_client_disconnects_total", route="r") == 1


def test_resume_and_hedge_keys_are_checked_at_load_time():
    route = (
        "resume: {on: [rest, cut], max: 0}\nhedge: {after: 0s, budget_percent: 101}\n"
        "framing: ndjson\n"
    )
    with pytest.raises(ConfigErrors) as errors:
        load_config_text(config_yaml("http://127.0.0.1:1", route=route), "t.yaml", env={})
    assert sorted(f"{e.path}: {e.message}" for e in errors.value.errors) == [
        "routes[0].hedge.after: must be greater than 0, got 0s",
        "routes[0].hedge.budget_percent: must be a percentage 0-100",
        "routes[0].resume.max: must be at least 1, got 0",
        "routes[0].resume.on[0]: unknown condition 'rest' (did you mean 'reset'?);"
        " known: reset, cut, chunk_gap_timeout",
        "routes[0].resume: resume continues SSE chat completions, not framing ndjson",
    ]


def test_explain_shows_the_resume_policy_and_each_upstreams_prefill():
    text = _config("http://127.0.0.1:1", "http://127.0.0.1:2", "resume: {max: 3}\n", "vllm")
    config = load_config_text(text, "t.yaml", env={})
    facts = RequestFacts("POST", "/v1/chat/completions", CIMultiDictProxy(CIMultiDict()), "m")
    lines = "\n".join(explain_lines(config, facts, stream=True))
    assert "resume: SSE chat completions broken by [reset, cut, chunk_gap_timeout], up to 3" in lines
    assert "prefill by upstream: up none, backup vllm" in lines


async def test_the_trace_shows_the_break_and_the_resume(start_gateway):
    exporter = InMemorySpanExporter()
    async with fake_llm(reset_after=4) as broken, fake_llm() as fallback:
        gw = await start_gateway(_config(broken.url, fallback.url))
        gw.runtime.tracing = Tracing.exporting_to(exporter, batch=False)
        text, _ = await _openai_stream(gw)
        await nothing_held(gw)
        gw.runtime.tracing.shutdown()
    assert text == TEXT
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is otel.SpanKind.SERVER]
    attempts = sorted(
        (s for s in spans if s.kind is otel.SpanKind.CLIENT),
        key=lambda s: s.attributes["streamgate.attempt"],
    )
    assert [e.name for e in server.events] == ["resume", "first_chunk"]
    assert server.events[0].attributes["streamgate.reason"] == "reset"
    assert server.attributes["streamgate.upstream"] == "backup"
    first, resumed = attempts
    assert (first.attributes["streamgate.try"], first.attributes["error.type"]) == (
        "first",
        "reset",
    )
    keys = ("streamgate.upstream", "streamgate.try", "streamgate.try_reason", "streamgate.outcome")
    assert [resumed.attributes[k] for k in keys] == ["backup", "resume", "reset", "ok"]
