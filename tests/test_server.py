"""`adactl serve` as a real server on 127.0.0.1: the openai client, bad input, many streams with
disconnects, failing controllers, admission. Tiny random Llama pairs with a character-level
tokenizer, built in-process; SmolLM2 in the `slow` test."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from adactl.controllers import FCFS, FixedDraftLength
from adactl.interface import Controller, ScheduleState
from adactl.loop import ControlLoop
from adactl.runtime import Engine, SamplingParams, StepPlan
from adactl.runtime.models import chat_ids, tiny_tokenizer
from adactl.server import EngineService, OpenAIServer, ServerThread, ServiceConfig, StackContext, build_stack
from adactl.server.text import TextStream

MODEL = "tiny"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def start(
    target: Any, draft: Any, tokenizer: Any, schedule: list[Any], config: ServiceConfig | None = None
) -> tuple[ServerThread, OpenAIServer]:
    engine = Engine(target, draft, tokenizer)
    server = OpenAIServer(
        EngineService(ControlLoop(engine, schedule), config=config), tokenizer, MODEL, engine.max_context
    )
    return ServerThread(server.app).start(), server


@pytest.fixture(scope="module")
def served(target: Any, draft: Any, tokenizer: Any) -> Iterator[tuple[ServerThread, OpenAIServer]]:
    thread, server = start(target, draft, tokenizer, [FCFS(), FixedDraftLength(3)])
    yield thread, server
    thread.stop()


def alone(target: Any, tokenizer: Any, prompt: list[int], max_tokens: int) -> str:
    """The text the engine gives this prompt run alone (greedy, no draft)."""
    engine = Engine(target, None, tokenizer)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=max_tokens))
    while engine.has_unfinished():
        engine.step()
    (result,) = [r for r in engine.pop_finished() if r.request_id == rid]
    return str(tokenizer.decode(result.output_ids, skip_special_tokens=True))


def metric(thread: ServerThread, sample: str) -> float:
    """The value of one sample (`name{labels}`) on the server's /metrics page (0 if absent)."""
    for line in httpx.get(thread.url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def settle(server: OpenAIServer, timeout: float = 10.0) -> None:
    """Wait until the server has no open request (cancels land between steps)."""
    deadline = time.monotonic() + timeout
    while server.service.open_requests() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_openai_client_streams_the_engines_greedy_text(served: Any, target: Any, tokenizer: Any) -> None:
    thread, server = served
    client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "Tell me about KV caches."}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=40,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone(target, tokenizer, chat_ids(tokenizer, messages), 40)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one piece
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"]) and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(tokenizer(text)["input_ids"]) or finish == ["stop"]

    prompt = "The quick brown fox"
    parts = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True))
    expected = alone(target, tokenizer, tokenizer(prompt)["input_ids"], 30)
    assert "".join(p.choices[0].text for p in parts) == expected
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                      extra_body={"priority": -2})  # vLLM's request priority, accepted  # fmt: skip
    assert whole.choices[0].text == expected and whole.usage is not None
    assert whole.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == text


BAD_INPUT = [
    (b'{"model": "tiny", "prompt": "hi"', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    ({"prompt": "hi"}, "model: Field required"),
    ({"model": "tiny"}, "prompt: Field required"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "tiny", "prompt": 42}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "other", "prompt": "hi"}, "'other' is not served here"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens: Input should be greater than 0"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10_000}, "beyond the context"),
    ({"model": "tiny", "prompt": "x" * 600}, "context holds"),
    ({"model": "tiny", "prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "temperature": 9}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, "n: Input should be less than or equal to 1"),
    ({"model": "tiny", "prompt": "hi", "seed": -1}, "seed"),
    ({"model": "tiny", "prompt": ""}, "prompt is empty"),
    ({"model": "tiny", "prompt": [5, 999]}, "outside the vocabulary"),
    ({"model": "tiny", "prompt": "hi", "consumption_rate": 0}, "consumption_rate: Input should be greater than 0"),
    ({"model": "tiny", "prompt": "hi", "consumption_rate": -2.5}, "consumption_rate"),
    ({"model": "tiny", "prompt": "hi", "consumption_rate": 4, "unit": "page"}, "unit"),
    ({"model": "tiny", "prompt": "hi", "unit": "word"}, "unit needs consumption_rate"),
    ({"model": "tiny", "prompt": "hi", "tpot_slo_ms": 0}, "tpot_slo_ms"),
    ({"model": "tiny", "prompt": "hi", "ttft_slo_ms": "soon"}, "ttft_slo_ms"),
    ({"model": "tiny", "prompt": "hi", "priority": 0.5}, "priority"),
]
BAD_CHAT = [
    ({"model": "tiny", "messages": []}, "messages: List should have at least 1 item"),
    ({"model": "tiny", "messages": "hello"}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "content"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion"),
]


def test_bad_input_answers_400_and_other_streams_go_on(served: Any, target: Any, tokenizer: Any) -> None:
    thread, server = served
    prompt = "A stream that runs while bad requests come in"

    async def main() -> tuple[str, list[tuple[int, dict[str, Any], str]]]:
        async with httpx.AsyncClient(base_url=thread.url, timeout=30) as http:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True}

            async def good_stream() -> str:
                text = ""
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            async def bad(case: Any, expect: str, path: str) -> tuple[int, dict[str, Any], str]:
                if isinstance(case, bytes):
                    r = await http.post(path, content=case, headers={"content-type": "application/json"})
                else:
                    r = await http.post(path, json=case)
                return r.status_code, r.json(), expect

            task = asyncio.create_task(good_stream())
            await asyncio.sleep(0.05)
            answers = [await bad(c, e, "/v1/completions") for c, e in BAD_INPUT]
            answers += [await bad(c, e, "/v1/chat/completions") for c, e in BAD_CHAT]
            return await task, answers

    text, answers = asyncio.run(main())
    for status, body, expect in answers:
        assert status == 400, (expect, body)
        assert body["error"]["type"] == "invalid_request_error"
        assert expect in body["error"]["message"], (expect, body)
    assert text == alone(target, tokenizer, tokenizer(prompt)["input_ids"], 60)
    settle(server)
    assert server.service.open_requests() == 0
    assert metric(thread, 'adactl_rejections_total{reason="invalid"}') >= 2  # the engine's own checks


def test_fifty_streams_with_random_disconnects_return_to_baseline(target: Any, draft: Any, tokenizer: Any) -> None:
    thread, server = start(target, draft, tokenizer, [FCFS(), FixedDraftLength(2)])
    engine = server.service.engine
    kv_before = engine.kv_bytes()
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(3, 30))) for _ in range(50)]
    lengths = [rng.randint(8, 48) for _ in prompts]
    leave_after = [rng.randint(1, 6) if rng.random() < 0.4 else None for _ in prompts]  # chunks, then disconnect

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
        await asyncio.sleep(rng.random() * 0.5)
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "stream": True}
        text, chunks = "", 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return i, text
                if line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    chunks += 1
                    if leave_after[i] is not None and chunks >= leave_after[i]:
                        return i, None  # leaving the `with` closes the connection mid-stream
        raise AssertionError(f"stream {i} ended without [DONE]")

    async def main() -> list[tuple[int, str | None]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=thread.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(50)))

    try:
        results = asyncio.run(main())
        settle(server)
        finished = [(i, text) for i, text in results if text is not None]
        assert len(finished) >= 20 and len(finished) < 50
        for i, text in finished:
            assert text == alone(target, tokenizer, tokenizer(prompts[i])["input_ids"], lengths[i]), i
        assert server.service.open_requests() == 0
        assert not engine.has_unfinished() and engine.cached_tokens() == 0
        assert engine.kv_bytes() <= kv_before
        assert metric(thread, 'adactl_requests_total{outcome="cancelled"}') >= 1
        assert metric(thread, "adactl_requests_running") == 0 and metric(thread, "adactl_requests_waiting") == 0
    finally:
        thread.stop()


class Boom(Controller):
    """Plans like FCFS with a draft of 2, but raises on every third step."""

    def __init__(self) -> None:
        self.calls = 0

    def act(self, state: ScheduleState, utilities: Any) -> StepPlan:
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("controller bug")
        return StepPlan(draft_len=2, prefill_budget=state.plan.prefill_budget)


def test_a_failing_controller_falls_back_and_shows_in_metrics(target: Any, draft: Any, tokenizer: Any) -> None:
    thread, server = start(target, draft, tokenizer, [Boom()])
    try:
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused")
        prompt = "the safe action keeps serving"
        for _ in range(2):
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
            assert out.choices[0].text == alone(target, tokenizer, tokenizer(prompt)["input_ids"], 30)
        assert httpx.get(thread.url + "/health").status_code == 200
        assert metric(thread, 'adactl_controller_fallbacks_total{decision="schedule:Boom"}') >= 3
    finally:
        thread.stop()


class AdmitNothing(Controller):
    def act(self, state: ScheduleState, utilities: Any) -> StepPlan:
        return StepPlan(admit=[])


def test_full_queue_answers_429_with_retry_after(target: Any, tokenizer: Any) -> None:
    thread, server = start(target, None, tokenizer, [AdmitNothing()], ServiceConfig(max_queue=2, max_queue_wait_s=4.0))
    # 4 s: the third request must arrive while the first two still wait (1.5 s was not always enough
    # on a loaded 2-core machine, where the third then found a free place in the queue)
    body = {"model": MODEL, "prompt": "wait", "max_tokens": 5, "stream": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=thread.url, timeout=30) as http:
            first = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
            while server.service.open_requests() < 2:
                await asyncio.sleep(0.01)
            third = await http.post("/v1/completions", json=body)
            return [third, *await asyncio.gather(*first)]

    try:
        t0 = time.monotonic()
        third, *queued = asyncio.run(main())
        assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
        assert "queue is full" in third.json()["error"]["message"]
        for r in queued:  # never left hanging: told to retry after max_queue_wait_s
            assert r.status_code == 429 and "Retry-After" in r.headers, r.text
        assert time.monotonic() - t0 < 15
        settle(server)
        assert server.service.open_requests() == 0 and not server.service.engine.has_unfinished()
        assert metric(thread, 'adactl_rejections_total{reason="overloaded"}') == 1
        assert metric(thread, 'adactl_rejections_total{reason="queue_timeout"}') == 2
    finally:
        thread.stop()


class Inbox:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def push(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)


class WatchQueue(AdmitNothing):
    """Admits nothing and notes, at each step, whether the service calls its queue full."""

    def __init__(self) -> None:
        self.service: EngineService | None = None
        self.seen: list[bool] = []

    def act(self, state: ScheduleState, utilities: Any) -> StepPlan:
        assert self.service is not None
        self.seen.append(self.service.overloaded())
        return super().act(state, utilities)


def test_a_request_counts_as_queued_from_submit_to_first_token(target: Any, tokenizer: Any) -> None:
    # the window the CI once hit: added to the engine (no longer pending) but not yet counted
    # as waiting until the step's end; a request arriving then found room in a full queue
    watch = WatchQueue()
    service = EngineService(ControlLoop(Engine(target, None, tokenizer), [watch]), config=ServiceConfig(max_queue=2))
    watch.service = service
    inboxes = [Inbox(), Inbox()]
    for inbox in inboxes:
        service.submit(inbox, [5, 6, 7], SamplingParams(max_new_tokens=3))
    assert service.overloaded()
    for _ in range(3):
        service.tick()
    assert watch.seen == [True, True, True] and service.overloaded()
    assert all(inbox.events == [("added",)] for inbox in inboxes)
    bad = Inbox()
    service.submit(bad, [5, 6, 7], SamplingParams(max_new_tokens=0))  # refused by the engine: leaves the queue
    service.tick()
    assert bad.events[0][0] == "error" and service.open_requests() == 2 and service.overloaded()


def test_text_stream_holds_back_stop_strings(tokenizer: Any) -> None:
    ids = tokenizer("Hello world. END here")["input_ids"]
    stream = TextStream(tokenizer, stop=["END", "zzz"])
    pieces = [stream.add([t]) for t in ids]
    assert "".join(pieces) + stream.finish() == "Hello world. "
    assert stream.stopped
    assert pieces[ids.index(tokenizer("E")["input_ids"][0])] == ""  # "E" could start "END": held back
    plain = TextStream(tokenizer)
    assert "".join(plain.add([t]) for t in ids) + plain.finish() == "Hello world. END here"


def test_stop_string_ends_the_request(served: Any, target: Any, tokenizer: Any) -> None:
    thread, server = served
    client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused")
    prompt = "stop strings"
    full = alone(target, tokenizer, tokenizer(prompt)["input_ids"], 40)
    stop = full[10:12]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop)
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    settle(server)
    assert server.service.open_requests() == 0


def test_stack_names() -> None:
    ctx = StackContext(step_time=None, acceptance=lambda name: None)
    stack = build_stack("fcfs-seqs8, fixed-k3", ctx)
    assert [type(c).__name__ for c in stack.schedule] == ["FCFS", "FixedDraftLength"] and stack.verify is None
    with pytest.raises(ValueError, match="unknown controller 'warp'"):
        build_stack("fcfs,warp", ctx)
    with pytest.raises(ValueError, match="goes last"):
        build_stack("sv,fcfs", ctx)


@pytest.mark.slow
def test_adactl_serve_default_stack_on_smollm2() -> None:
    """The default stack on the default models, built as `adactl serve` builds it."""
    from adactl.server.main import ServeSettings, build_server

    args = ServeSettings()
    server = build_server(args)
    torch.manual_seed(0)
    with ServerThread(server.app) as thread:
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chunks = list(
            client.chat.completions.create(
                model=server.model_name,
                messages=messages,
                max_tokens=24,  # type: ignore[arg-type]
                temperature=0,
                stream=True,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        engine = server.service.engine
        assert text == alone(engine.target, server.tokenizer, chat_ids(server.tokenizer, messages), 24)
        assert "Paris" in text


class FlakyEngine(Engine):
    """The real engine with one injected fault: its `fail_at`-th verify raises mid-step."""

    fail_at = 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verifies = 0

    def verify(self, *args: Any, **kwargs: Any) -> Any:
        self.verifies += 1
        if self.verifies == self.fail_at:
            raise RuntimeError("injected fault")
        return super().verify(*args, **kwargs)


def test_an_engine_error_fails_open_requests_and_serving_goes_on(target: Any, draft: Any, tokenizer: Any) -> None:
    engine = FlakyEngine(target, draft, tokenizer)
    server = OpenAIServer(EngineService(ControlLoop(engine, [FCFS(), FixedDraftLength(2)])), tokenizer, MODEL,
                          engine.max_context)  # fmt: skip
    with ServerThread(server.app) as thread:
        body = {"model": MODEL, "prompt": "doomed", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", thread.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert "injected fault" in lines[-2] and lines[-1] == "data: [DONE]"
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused")
        out = client.completions.create(model=MODEL, prompt="after the fault", max_tokens=20, temperature=0)
        assert out.choices[0].text == alone(target, tokenizer, tokenizer("after the fault")["input_ids"], 20)
        settle(server)
        assert server.service.open_requests() == 0 and engine.cached_tokens() == 0
        assert metric(thread, "adactl_engine_errors_total") == 1
        assert metric(thread, 'adactl_requests_total{outcome="error"}') == 1
