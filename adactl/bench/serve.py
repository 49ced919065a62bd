"""`adactl bench serve`: `adactl serve` under open-loop load, next to `transformers serve`.

Each server runs as its own process on 127.0.0.1 (`adactl serve --controllers STACK` per
`--stacks` entry; the peer, `transformers serve --continuous-batching` on the same target as a
Hugging Face directory). An asyncio load generator (httpx, loopback only, bounded by request
count and a time limit) sends held-out ShareGPT first turns (at most `--max-prompt-tokens`;
`max_tokens` = the recorded reply length clipped to `--max-output-tokens`; greedy) as
streaming chat completions, arriving as a Poisson process at each `--rates` rate (Gamma gaps
with `--burstiness` < 1). Every server gets the same requests at the same times. Each
request is read by a consumer from `workloads.consumer_mix` (`--consumers`); adactl is told
the consumer (`consumption_rate`, `unit`, `ttft_slo_ms`), the peer rejects unknown fields and
is not.

Measured at the client, identically for every server: TTFT (from the scheduled arrival to the
first content), TPOT ((last - first chunk) / (tokens - 1), tokens counted by the target's
tokenizer), output tokens/s, unit-deadline misses (the client's own `Playback` of what
arrived when), rejections (429) and errors. A rejected request's TTFT counts as infinite.
`capacity_ttft`: the largest rate with p99 TTFT <= `--ttft-target`; `capacity_slo`: the same
with unit-deadline misses <= 0.5% too. A server that misses the TTFT target by 3x stops its
sweep there. Writes `bench_results/serve.json` and `serve.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adactl import metrics, settings
from adactl.bench.common import format_table, save_figure, write_json
from adactl.runtime.device import describe, device_and_dtype, dtype_name, resolve_device, resolve_dtype
from adactl.runtime.stream import Playback, Stream, count_units
from adactl.settings import (
    DeviceSettings,
    PairSettings,
    ProfileSettings,
    RunSettings,
    ServerLimits,
    WorkloadSettings,
    setting,
)
from adactl.stacks import stack_list
from adactl.workloads import arrival_times, consumer_mix

PEER = "transformers-serve"
STACKS = ["fcfs", "andes", "progressserve,ttft-budget", "fcfs,goodput"]  # plain FCFS is vLLM's policy
COLUMNS = ["server", "rate", "ttft_p50_s", "ttft_p99_s", "tpot_s", "tokens_per_s", "miss_rate", "rejected", "errors",
           "capacity_ttft", "capacity_slo"]  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One request of the workload."""

    text: str
    max_tokens: int
    stream: Stream
    prompt: tuple[int, ...] = ()  # the text's token ids by the chat template (what the server computes)


@dataclass
class Server:
    """A server under test: where it listens, the model name it wants, how to stop it."""

    name: str
    url: str
    model: str
    extras: bool  # takes adactl's request fields
    stop: Any


# --------------------------------------------------------------- load
async def _request(http: Any, server: Server, job: Job, start: float, at: float) -> dict[str, Any]:
    """Send one streaming chat completion at `start + at`; record when each piece of text came."""
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    body: dict[str, Any] = {"model": server.model, "messages": [{"role": "user", "content": job.text}],
                            "max_tokens": job.max_tokens, "temperature": 0, "stream": True}  # fmt: skip
    if server.extras:
        body.update(consumption_rate=job.stream.rate, unit=job.stream.unit, ttft_slo_ms=job.stream.ttft_s * 1000)
    chunks: list[tuple[float, int]] = []  # (seconds from start, characters of text so far)
    text, status = "", 0
    try:
        async with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        status = 500
                        break
                    for choice in data.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            text += piece
                            chunks.append((time.perf_counter() - start, len(text)))
    except Exception as e:  # noqa: BLE001 - a dropped connection is a measured error, not a crash
        status = -1
        text = f"{type(e).__name__}: {e}"
    return {"arrival": at, "status": status, "chunks": chunks, "text": text if status == 200 else ""}


async def _load(server: Server, jobs: list[Job], times: list[float], limit_s: float, bar: tqdm) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(jobs) + 8, max_keepalive_connections=len(jobs) + 8)
    timeout = httpx.Timeout(limit_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        start = time.perf_counter() + 0.2

        async def one(job: Job, at: float) -> dict[str, Any]:
            out = await _request(http, server, job, start, at)
            bar.update(1)
            return out

        tasks = [asyncio.create_task(one(j, t)) for j, t in zip(jobs, times)]
        done, pending = await asyncio.wait(tasks, timeout=limit_s + max(times, default=0.0))
        for task in pending:  # bounded: what has not finished by the limit is an error
            task.cancel()
        return [t.result() if t in done else {"arrival": 0.0, "status": -2, "chunks": [], "text": ""} for t in tasks]


# ------------------------------------------------------------ measure
@dataclass(frozen=True)
class Received:
    """What a client received of one request: its arrival (seconds from the run's start), the
    HTTP status (200, 429, an error), and per piece of output (when, tokens so far, complete
    units so far)."""

    arrival: float
    status: int
    chunks: list[tuple[float, int, int]]


def received(result: dict[str, Any], job: Job, tokenizer: Any) -> Received:
    """A streamed HTTP response as `Received`: tokens counted by the target's tokenizer, units
    by the text that had arrived."""
    if result["status"] != 200 or not result["chunks"]:
        return Received(result["arrival"], result["status"], [])
    chunks, text = result["chunks"], result["text"]
    counts = [len(tokenizer(text[:n], add_special_tokens=False)["input_ids"]) for _, n in chunks]
    last = len(chunks) - 1
    return Received(result["arrival"], 200, [(t, k, count_units(job.stream.unit, k, text[:n], i == last))
                                             for i, ((t, n), k) in enumerate(zip(chunks, counts))])  # fmt: skip


def account(results: list[Received], jobs: list[Job]) -> dict[str, Any]:
    """TTFT, TPOT, throughput, misses and rejections of one run, from what the client saw."""
    ttft, tpot, tokens_total = [], [], 0
    units = misses = rejected = errors = 0
    last = 0.0
    for result, job in zip(results, jobs):
        if result.status == 429:
            rejected += 1
            ttft.append(math.inf)
            continue
        if result.status != 200 or not result.chunks:
            errors += 1
            ttft.append(math.inf)
            continue
        chunks, at = result.chunks, result.arrival
        n_tokens = chunks[-1][1]
        tokens_total += n_tokens
        ttft.append(chunks[0][0] - at)
        per_token = metrics.tpot(chunks[0][0], chunks[-1][0], n_tokens)
        if per_token is not None:
            tpot.append(per_token)
        last = max(last, chunks[-1][0])
        playback = Playback(job.stream, at)
        for i, (t, k, done) in enumerate(chunks):
            end = i == len(chunks) - 1
            playback.produce(done, k, t, end)
        u, m = playback.settle()
        units, misses = units + u, misses + m
    first = min((r.arrival for r in results), default=0.0)
    return {
        **metrics.latency_summary(ttft, tpot, tpot_p99=True),
        "tokens_per_s": tokens_total / max(last - first, 1e-9),
        metrics.MISS_RATE: misses / max(units, 1),
        "units": units,
        "misses": misses,
        "rejected": rejected,
        "errors": errors,
        "requests": len(results),
    }


def add_capacity(records: list[dict[str, Any]], ttft_target: float) -> None:
    """Per server: the largest rate with p99 TTFT <= target (and, for capacity_slo, misses <= 0.5%)."""
    for server in {r["server"] for r in records}:
        mine = [r for r in records if r["server"] == server]
        ok = [r for r in mine if r["ttft_p99_s"] is not None and r["ttft_p99_s"] <= ttft_target]
        cap_ttft = max((r["rate"] for r in ok), default=0.0)
        cap_slo = max((r["rate"] for r in ok if r[metrics.MISS_RATE] <= metrics.SLO_MISS_RATE), default=0.0)
        for r in mine:
            r["capacity_ttft"], r["capacity_slo"] = cap_ttft, cap_slo


def ratios(records: list[dict[str, Any]], reference: str = PEER) -> dict[str, Any]:
    """Each other server's capacities over the `reference` server's capacity at the TTFT target."""
    peer = next((r["capacity_ttft"] for r in records if r["server"] == reference), None)
    out: dict[str, Any] = {"reference": reference, "peer_capacity_ttft": peer}
    for server in sorted({r["server"] for r in records} - {reference}):
        r = next(x for x in records if x["server"] == server)
        out[server] = {
            "capacity_ttft": r["capacity_ttft"],
            "capacity_slo": r["capacity_slo"],
            "ratio_ttft": r["capacity_ttft"] / peer if peer else None,
            "ratio_slo": r["capacity_slo"] / peer if peer else None,
        }
    return out


TITLE = "adactl serve vs transformers serve --continuous-batching (client-side measurement)"


def plot(records: list[dict[str, Any]], path: Path, ttft_target: float, machine: str = "", title: str = TITLE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for server in sorted({r["server"] for r in records}):
        mine = sorted((r for r in records if r["server"] == server), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        style = "k--" if server == PEER else "-"
        p99 = [min(r["ttft_p99_s"] or math.inf, 10 * ttft_target) for r in mine]
        axes[0].plot(rates, p99, style, marker="o", label=server)
        axes[1].plot(rates, [100 * r["miss_rate"] for r in mine], style, marker="o", label=server)
        axes[2].plot(rates, [r["tokens_per_s"] for r in mine], style, marker="o", label=server)
    axes[0].axhline(ttft_target, color="grey", lw=0.8)
    axes[0].set_yscale("log")
    axes[1].axhline(100 * metrics.SLO_MISS_RATE, color="grey", lw=0.8)
    for ax, label in zip(axes, ["p99 TTFT (s; rejected = inf, clipped)", "unit-deadline misses (%)", "output tok/s"]):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    save_figure(fig, path, title + (f", {machine}" if machine else ""), fontsize=12)


# ------------------------------------------------------------ servers
def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")


def _spawn(name: str, cmd: list[str], url: str, model: str, extras: bool, log: Path, env: dict[str, str]) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w")  # noqa: SIM115 - closed in stop()
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        handle.close()

    try:
        _wait_ready(url, proc, 600)
    except Exception:
        stop()
        raise
    return Server(name, url, model, extras, stop)


def start_adactl(stack: str, args: ServeBenchSettings, log: Path) -> Server:
    from adactl.server import free_port
    from adactl.server.main import served_name

    port = free_port()
    cmd = [sys.executable, "-m", "adactl.cli", "serve", "--controllers", stack, "--port", str(port),
           "--model", args.target, "--draft", args.draft, "--max-batch", str(args.max_batch),
           "--max-queue", str(args.max_queue), "--max-queue-wait", str(args.max_queue_wait),
           "--prefill-budget", str(args.prefill_budget), "--max-draft-len", str(args.max_draft_len),
           "--log-level", "warning", "--device", args.device, "--dtype", args.dtype,
           *(["--profile", args.profile] if args.profile else []),
           *([] if args.refine else ["--no-refine"])]  # fmt: skip
    return _spawn(f"adactl[{stack}]", cmd, f"http://127.0.0.1:{port}", served_name(args.target), True, log,
                  dict(os.environ))  # fmt: skip


def start_peer(args: ServeBenchSettings, log: Path) -> Server:
    from adactl.runtime.models import DEFAULT_ALIASES, default_target_dir
    from adactl.server import free_port

    model = str(default_target_dir()) if args.target in DEFAULT_ALIASES else args.target
    port = free_port()
    resolved = resolve_device(args.device)
    device = "cuda" if resolved.type == "cuda" else "cpu"
    dtype = dtype_name(resolve_dtype(args.dtype, resolved))  # ours: the peer's `auto` is the checkpoint's dtype
    cmd = ["transformers", "serve", model, "--continuous-batching", "--device", device, "--dtype", dtype,
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # a local directory: never reach for a hub
    return _spawn(PEER, cmd, f"http://127.0.0.1:{port}", model, False, log, env)


def start_tiny(stack: str) -> Server:
    """An in-process `adactl serve` on a tiny random Llama (smoke runs and tests)."""
    from adactl.estimators.step_time import tiny_step_time
    from adactl.runtime.models import perturbed_copy, tiny_llama, tiny_tokenizer
    from adactl.server import ServerThread
    from adactl.server.main import assemble
    from adactl.stacks import StackContext, build_stack, untrained_acceptance

    target = tiny_llama()
    tokenizer = tiny_tokenizer()
    built = build_stack(stack, StackContext(tiny_step_time(), untrained_acceptance))
    if built.needs_companion:
        raise ValueError(f"--tiny runs have no companion: drop sv/adaserve from {stack!r}")
    server = assemble(target, perturbed_copy(target, 0.03, 1), tokenizer, built, "tiny", max_batch=256, max_draft_len=4)
    thread = ServerThread(server.app).start()
    return Server(f"adactl[{stack}]", thread.url, "tiny", True, thread.stop)


def _warm_up(server: Server, job: Job) -> None:
    """A few requests before measuring (the first request of a process pays for lazy set-up)."""
    bar = tqdm(disable=True)
    short = Job(job.text, 8, job.stream)
    asyncio.run(_load(server, [short] * 4, [0.0, 0.0, 0.5, 0.5], 120.0, bar))


# ----------------------------------------------------------------- main
def workload(args: ServeBenchSettings) -> tuple[Any, list[Job]]:
    streams = consumer_mix(args.requests, args.seed, args.ttft, tokens_only=args.consumers == "tokens")
    if args.tiny:
        import random

        from adactl.runtime.models import chat_ids, tiny_tokenizer

        rng = random.Random(args.seed)
        tiny = tiny_tokenizer()
        texts = ["".join(rng.choice("abcdefgh ijk") for _ in range(rng.randint(4, 24))) for _ in streams]
        return tiny, [Job(t, rng.randint(8, 24), Stream(s.rate, "token", s.ttft_s),
                          tuple(chat_ids(tiny, [{"role": "user", "content": t}])))
                      for t, s in zip(texts, streams)]  # fmt: skip
    from transformers import AutoTokenizer

    from adactl.runtime.models import DEFAULT_ALIASES, default_target_dir
    from adactl.workloads import chat_texts, read_sharegpt

    path = default_target_dir() if args.target in DEFAULT_ALIASES else args.target
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:  # the replay learns nothing from them: every record, for sweeps of 1,000 requests and more
        chats = chat_texts(tokenizer, args.requests, args.max_prompt_tokens, args.max_output_tokens,
                           read_sharegpt(), held_out=not args.replay)  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"adactl bench serve: {e}; ask for fewer --requests or a longer --max-prompt-tokens") from None
    return tokenizer, [Job(text, n, s, tuple(ids)) for (text, ids, n), s in zip(chats, streams)]


def _launch(stack: str, args: ServeBenchSettings, out: Path) -> Server:
    if args.tiny:
        return start_tiny(stack)
    return start_adactl(stack, args, out / "logs" / f"adactl-{stack.replace(',', '+')}.log")


def main(namespace: argparse.Namespace) -> list[dict[str, Any]]:
    return run(settings.from_args(ServeBenchSettings, namespace))


def run(args: ServeBenchSettings) -> list[dict[str, Any]]:
    if args.replay:
        from adactl.bench import serve_replay

        return serve_replay.run(args)
    device_and_dtype(args.device, args.dtype)  # a bad device or dtype is an error before any server starts
    tokenizer, jobs = workload(args)
    out = Path(args.out)
    launchers: list[Callable[[], Server]] = [functools.partial(_launch, s, args, out) for s in args.stacks]
    if args.peer and not args.tiny:
        launchers.insert(0, functools.partial(start_peer, args, out / "logs" / "transformers-serve.log"))
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(launchers) * len(args.rates) * len(jobs), desc="bench serve", unit="req")
    for launch in launchers:
        server = launch()
        try:
            _warm_up(server, jobs[0])
            for rate in args.rates:
                times = arrival_times(len(jobs), rate, args.seed, args.burstiness)
                results = asyncio.run(_load(server, jobs, times, args.time_limit, bar))
                got = [received(r, job, tokenizer) for r, job in zip(results, jobs)]
                record = {"server": server.name, "rate": rate, **account(got, jobs)}
                records.append(record)
                tqdm.write(f"{server.name} @ {rate}/s: TTFT p99 {record['ttft_p99_s']:.2f} s, "
                           f"misses {100 * record['miss_rate']:.1f}%, {record['tokens_per_s']:.0f} tok/s, "
                           f"{record['rejected']} rejected")  # fmt: skip
                if record["ttft_p99_s"] is None or record["ttft_p99_s"] > 3 * args.ttft_target:
                    bar.update(len(jobs) * (len(args.rates) - args.rates.index(rate) - 1))
                    break  # far past the target: higher rates only take longer to fail
        finally:
            server.stop()
    bar.close()
    add_capacity(records, args.ttft_target)
    summary = ratios(records)
    print(format_table(records, COLUMNS))
    print(json.dumps(summary, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    machine = describe(*device_and_dtype(args.device, args.dtype)).to_dict()
    meta = {"summary": summary, "machine": machine,
            "args": asdict(args)}  # fmt: skip
    write_json(out / "serve.json", records, meta)
    plot(records, out / "serve.png", args.ttft_target, str(machine["label"]))
    return records


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


@dataclass(frozen=True)
class ServeBenchSettings(WorkloadSettings, PairSettings, ServerLimits, RunSettings, DeviceSettings, ProfileSettings):
    """`adactl bench serve` (`max_batch`, `max_queue`, `max_queue_wait`, `prefill_budget`,
    `max_draft_len`, `profile`, `refine`: each adactl server's)."""

    stacks: list[str] = setting(STACKS, f"adactl controller stacks, ';'-separated (default: {';'.join(STACKS)})",
                                parse=stack_list)  # fmt: skip
    peer: bool = setting(True, "skip transformers serve")
    rates: list[float] = setting([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0], "requests/s", parse=_floats)
    requests: int = setting(90, "requests per rate")
    consumers: str = setting("tokens", "as bench stream's", choices=["mixed", "tokens"])
    ttft_target: float = setting(2.0, "the p99 TTFT a served rate must keep (s)")
    max_output_tokens: int = setting(64, "replies are clipped to this")
    time_limit: float = setting(300.0, "seconds a rate's run may take at most")
    max_queue_wait: float = setting(60.0, "seconds a request may wait to start")
    prefill_budget: int = setting(512, "prompt tokens per step")
    max_draft_len: int = setting(8, "draft tokens per row per step, at most")
    replay: bool = setting(False, "serve on the replay in simulated time (adactl.bench.serve_replay), priced by "
                           "--profile: a computed GPU profile's name or a profile file")  # fmt: skip
    replay_noise: float = setting(0.1, "--replay: log-sd of replayed step times")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, ServeBenchSettings)
