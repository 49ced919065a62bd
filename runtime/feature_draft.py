"""An EAGLE-style draft: one decoder layer that reads the target's hidden states (the last one,
EAGLE-1, as below; or several fused, EAGLE-3: `feature_layers`, the shipped default).

A plain draft model re-derives everything from tokens; this one is given the target's final
hidden state ("feature") at each position, so one small layer is enough to predict the next
feature well (EAGLE, Li et al. 2024). At cache position p the input is the embedding of
token x_p joined with the target's feature f_{p-1} (zeros at p = 0); the output g_p
estimates f_p, and the target's own output rows turn it into next-token logits. While
drafting, the draft feeds its own g back as the feature of the next position; after
verification the engine re-feeds the accepted tokens with the target's true features.

The output layer covers a reduced vocabulary (the most frequent target tokens, as FR-Spec
does), because a 49,152-row output layer would cost more than the layer itself; tokens
outside it are never drafted (and so never accepted). The token embedding and the output
rows are the target's own, frozen and not stored: a saved draft holds only the input
projection, the decoder layer, its norm and the vocabulary ids (a few MB).

Fused features (EAGLE-3): a draft whose config names several `feature_layers` reads the
target's hidden states after a low, a middle and a high layer instead of the last one,
concatenated and projected to the hidden size by its own `fuse` layer
(`target_features(hidden_states)`, which the engine calls on every target forward that
feeds the draft). While drafting it feeds back its own output g as the next feature, as a
single-feature draft does; it is trained for that (training-time test), not to regress g
onto a target feature. With `input_norm` the embedding, the feature and each fused hidden
state are RMS-normalised before they are joined (EAGLE-3's input norms). Its companion (SV)
has no fuse layer: it reads what the draft reads, the fused features and then the draft's own
g, so it is trained next to that draft and names it (`reads_draft`, the draft's digest).

Contract: `forward(input_ids, features, ...)` takes the same cache arguments as a Hugging Face
causal LM (so `BatchKV.forward` drives it) and returns `.logits` over `vocab_ids` and
`.hidden_states` (the g above, [n, T, H]).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .kv import cache_kwargs

WEIGHTS = "model.safetensors"
CONFIG = "feature_draft.json"


@dataclass
class FeatureDraftConfig:
    """What a saved feature draft needs besides its target."""

    intermediate_size: int = 1536  # the decoder layer's MLP width
    num_layers: int = 1
    vocab_ids: list[int] = field(default_factory=list)  # [N] target token ids the draft can propose
    target_name: str = ""  # the target it was trained against (checked loosely: hidden size and vocabulary)
    target_hidden_size: int = 0
    target_vocab_size: int = 0
    feature_layers: list[int] = field(default_factory=list)
    """The target hidden states read, as indices of transformers' `hidden_states` (0: the
    embeddings, i: after layer i). Empty: the last (the final norm's output, EAGLE-1);
    several: fused by a linear layer (EAGLE-3)."""
    input_norm: bool = False
    """RMS-normalise the token embedding and the feature before joining them (EAGLE-3's
    `input_layernorm` and `hidden_norm`), and each fused hidden state before the fuse layer:
    a middle layer's hidden states are ~10x the embedding's scale, with outlier dimensions in
    the tens of thousands, which otherwise swamp everything else the draft reads."""
    reads_draft: str = ""
    """A companion of a fused-feature draft: that draft's `digest`. Such a companion reads the
    draft's fused features and its drafted outputs (what `WithCompanion` feeds it), so it pairs
    with that draft only."""


@dataclass
class FeatureDraftOutput:
    logits: torch.Tensor  # [n, T or logits_to_keep, N] over vocab_ids
    hidden_states: torch.Tensor  # [n, T, H] predicted target features
    companion_logits: torch.Tensor | None = None  # [n, T or logits_to_keep, N_c] over companion_vocab_ids


class FeatureDraft(nn.Module):
    """See the module docstring. Build with `FeatureDraft.from_target`, load with `load`."""

    reads_target_features = True

    def __init__(self, target: PreTrainedModel, config: FeatureDraftConfig) -> None:
        super().__init__()
        text = target.config.get_text_config()
        if not config.vocab_ids:
            raise ValueError("a feature draft needs a non-empty vocabulary (vocab_ids)")
        self.config = config
        layer_config = LlamaConfig(**{**text.to_dict(), "num_hidden_layers": config.num_layers})
        layer_config.intermediate_size = config.intermediate_size
        layer_config.vocab_size = 1  # the embedding is the target's; this one is dropped below
        layer_config.pad_token_id = None
        self.model = LlamaModel(layer_config)
        self.model.embed_tokens = None  # type: ignore[assignment]
        hidden = int(text.hidden_size)
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        fused = len(config.feature_layers) * hidden
        self.fuse = nn.Linear(fused, hidden, bias=False) if config.feature_layers else None
        eps = float(getattr(text, "rms_norm_eps", 1e-6))
        self.embed_norm = LlamaRMSNorm(hidden, eps) if config.input_norm else None
        self.feature_norm = LlamaRMSNorm(hidden, eps) if config.input_norm else None
        self.eps = eps
        ids = torch.tensor(config.vocab_ids, dtype=torch.long)
        self.register_buffer("vocab_ids", ids, persistent=False)
        # frozen references to the target's weights (not parameters of this module)
        self._embed = [target.get_input_embeddings()]
        head = target.get_output_embeddings()
        assert head is not None, "the target needs an output layer"
        self.register_buffer("head_weight", head.weight.detach()[ids].clone(), persistent=False)
        self.hidden_size = hidden
        self.digest = ""  # of the saved weights (`save`, `load`): a companion names the draft it reads

    # the engine and BatchKV treat the draft like a Hugging Face model
    def get_text_config(self) -> Any:
        return self.model.config

    def target_features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The features this draft reads, [n, T, H], from a target forward's `hidden_states`
        (run with `output_hidden_states=True`)."""
        if self.fuse is None:
            return hidden_states[-1]
        return self.fuse_layers(torch.cat([hidden_states[i] for i in self.config.feature_layers], dim=-1))

    def fuse_layers(self, picked: torch.Tensor) -> torch.Tensor:
        """[n, T, len(feature_layers) * H] concatenated hidden states -> the fused feature [n, T, H]."""
        assert self.fuse is not None, "fuse_layers is for a fused-feature draft"
        x = picked.to(self.fuse.weight.dtype)
        if self.config.input_norm:  # each layer's hidden state to unit RMS (no weights: fuse scales them)
            parts = x.unflatten(-1, (len(self.config.feature_layers), self.hidden_size)).float()
            x = F.rms_norm(parts, (self.hidden_size,), eps=self.eps).flatten(-2).to(x.dtype)
        return self.fuse(x)

    @classmethod
    def from_target(
        cls, target: PreTrainedModel, vocab_ids: list[int], intermediate_size: int = 1536, seed: int = 0,
        feature_layers: list[int] | None = None, input_norm: bool = False,
    ) -> FeatureDraft:  # fmt: skip
        """A freshly initialised draft for `target` (the decoder layer starts as a random Llama
        layer); `feature_layers`: see `FeatureDraftConfig` (None: the last hidden state)."""
        text = target.config.get_text_config()
        config = FeatureDraftConfig(
            intermediate_size=intermediate_size,
            vocab_ids=[int(t) for t in vocab_ids],
            target_name=str(getattr(target.config, "_name_or_path", "")),
            target_hidden_size=int(text.hidden_size),
            target_vocab_size=int(target.get_output_embeddings().weight.shape[0]),
            feature_layers=[int(i) for i in feature_layers or []],
            input_norm=input_norm,
        )
        layers = int(text.num_hidden_layers)
        if any(not 0 <= i <= layers for i in config.feature_layers):
            raise ValueError(f"feature layers {config.feature_layers} outside the target's hidden states [0, {layers}]")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            draft = cls(target, config)
        param = next(target.parameters())
        return draft.on(param.device, param.dtype)

    def on(self, device: torch.device | str, dtype: torch.dtype) -> FeatureDraft:
        """Move to the target's device and dtype (drafts follow the target), keeping the rotary
        frequencies in float32: rounded to bf16 they would shift every position's angle."""
        rope = {name: b.detach().float().to(device) for name, b in self.named_buffers() if "inv_freq" in name}
        self.to(device, dtype)
        for name, value in rope.items():
            module_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(module_name) if module_name else self, attr, value)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> FeatureDraftOutput:
        """input_ids [n, T]; features [n, T, H] = the target feature of the position before each token."""
        embeds = self._embed[0](input_ids).to(self.fc.weight.dtype)
        features = features.to(embeds.dtype)
        if self.embed_norm is not None and self.feature_norm is not None:
            embeds, features = self.embed_norm(embeds), self.feature_norm(features)
        x = self.fc(torch.cat([embeds, features], dim=-1))
        out = self.model(
            inputs_embeds=x,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(self.model, cache),
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state  # [n, T, H]
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return FeatureDraftOutput(logits=kept @ self.head_weight.T, hidden_states=hidden)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights a saved draft stores (not the target's embedding or output rows)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.embed_tokens")}

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.trainable_state().items()}
        save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
        (path / CONFIG).write_text(json.dumps(asdict(self.config), indent=1) + "\n")
        self.digest = state_digest(state)

    @classmethod
    def load(cls, path: str | Path, target: PreTrainedModel) -> FeatureDraft:
        """Load a saved draft for `target`; raises ValueError if it was made for another model shape."""
        path = Path(path)
        config = FeatureDraftConfig(**json.loads((path / CONFIG).read_text()))
        text = target.config.get_text_config()
        vocab = int(target.get_output_embeddings().weight.shape[0])
        if config.target_hidden_size != int(text.hidden_size) or config.target_vocab_size != vocab:
            raise ValueError(
                f"{path} is a feature draft for a target with hidden size {config.target_hidden_size} and "
                f"{config.target_vocab_size} tokens, but this target has {int(text.hidden_size)} and {vocab}"
            )
        draft = cls(target, config)
        param = next(target.parameters())
        saved = load_file(str(path / WEIGHTS))
        draft.digest = state_digest(saved)
        state = {k: v.to(param.dtype) for k, v in saved.items()}
        missing, unexpected = draft.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("model.embed_tokens")]
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match the draft (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return draft.on(param.device, param.dtype).eval()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short fingerprint of saved weights (as stored: the same file gives the same digest)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_pair(draft: FeatureDraft, companion: FeatureDraft) -> None:
    """Raise ValueError unless `companion` reads the features `draft` gives it: the target's
    last hidden state for both, or, next to a fused-feature draft, a companion trained on
    that very draft's outputs (`reads_draft`)."""
    if companion.fuse is not None:
        raise ValueError("a companion reads the draft's features: it cannot fuse hidden states of its own")
    if draft.fuse is None:
        if companion.config.reads_draft:
            raise ValueError(
                "this companion was trained next to a fused-feature draft; pair it with that draft (the v1 draft, "
                "draft-v1, pairs with companion-v1)"
            )
        return
    if companion.config.reads_draft != draft.digest:
        mate = companion.config.reads_draft
        reads = f"draft {mate}" if mate else "the target's last hidden state"
        raise ValueError(
            f"the draft fuses target hidden states {draft.config.feature_layers}, and its companion must be trained "
            f"on its outputs: the shipped draft pairs with the shipped companion (--companion companion); for another "
            f"draft, python train/distill_draft.py --name companion --reads-draft DRAFT_DIR --out DIR. This companion "
            f"reads {reads}, the draft is {draft.digest or 'unsaved'}"
        )


class WithCompanion(nn.Module):
    """A feature draft run together with its companion (Speculative Verification).

    The companion reads exactly what the draft reads: the same tokens and features, including
    the draft's own predicted features while drafting. So at draft position j its output is
    p_companion(. | context, d_1 .. d_{j-1}), the second opinion that SV's acceptance features
    (S = sum_v min(p_draft, p_comp), A = min(1, p_comp(d_j) / p_draft(d_j))) compare with the
    draft's. One KV cache holds both: the companion's layers come after the draft's, so the
    engine rolls both back together. Outputs are the draft's plus `companion_logits`.

    The pair owns the companion: its layers are renumbered, so do not also use it alone.
    """

    reads_target_features = True

    def __init__(self, draft: FeatureDraft, companion: FeatureDraft) -> None:
        super().__init__()
        if draft.hidden_size != companion.hidden_size:
            raise ValueError("the draft and its companion must read the same target (hidden sizes differ)")
        check_pair(draft, companion)
        self.draft, self.companion = draft, companion
        for i, layer in enumerate(companion.model.layers):
            layer.self_attn.layer_idx = draft.config.num_layers + i  # type: ignore[union-attr]
        self.config = draft.config
        self.hidden_size = draft.hidden_size
        self.register_buffer("vocab_ids", torch.as_tensor(draft.vocab_ids), persistent=False)
        self.register_buffer("companion_vocab_ids", torch.as_tensor(companion.vocab_ids), persistent=False)

    def target_features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.draft.target_features(hidden_states)

    def get_text_config(self) -> Any:
        text = self.draft.get_text_config().__class__(**self.draft.get_text_config().to_dict())
        text.num_hidden_layers = self.draft.config.num_layers + self.companion.config.num_layers
        return text

    def forward(
        self, input_ids: torch.Tensor, features: torch.Tensor, cache: Any = None, **kwargs: Any
    ) -> FeatureDraftOutput:
        out = self.draft(input_ids, features, cache=cache, **kwargs)
        out.companion_logits = self.companion(input_ids, features, cache=cache, **kwargs).logits
        return out


def is_feature_draft(model: Any) -> bool:
    return bool(getattr(model, "reads_target_features", False))
