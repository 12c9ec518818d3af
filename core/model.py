"""The behaviour model: a causal transformer over events, in the Hugging Face shape.

Each event is a handful of categorical fields (see core.sequences.FIELDS). Every field has its own
embedding table; their sum is the event's token. A learned BOS event goes in front, a GPT-2
decoder reads the sequence causally, and one head per field predicts the *next* event's value of
that field, so a single forward pass gives every event a surprisal: the negative log-likelihood
of what was observed, summed over fields. A sequence head pools the hidden states into one fraud
logit, trained when labels exist.

Index convention (from core.sequences): 0 = padding, 1 = absent, 2 = unknown, 3.. = values.
Padding and absent fields contribute nothing to surprisal; an unknown value does (it is news).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    GPT2Config,
    GPT2Model,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.utils import ModelOutput

MODEL_TYPE = "fraudlens-behavior"
PAD_INDEX = 0
ABSENT_INDEX = 1  # field values <= this are not predicted (padding, absent)

SizeName = Literal["tiny", "small", "medium", "base"]
# `small` is the CPU default. On the demo world (same split, 6 epochs) it matched `medium`'s
# unsupervised AUPRC (val/test/unseen world 0.45/0.28/0.40 vs 0.43/0.28/0.38) while scoring
# 3.5x faster (88k vs 25k events/s on 2 cores) and training 8x faster: next-event structure
# in behaviour logs is simple enough that width and depth beyond this buy lower NLL, not
# better rankings. `medium` stays for logs with richer structure (and to re-run that check).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 32, "n_layers": 2, "n_heads": 2},  # tests, seconds on CPU
    "small": {"hidden_size": 64, "n_layers": 2, "n_heads": 4},  # CPU default, ~0.13M parameters
    "medium": {"hidden_size": 128, "n_layers": 4, "n_heads": 4},  # ~0.85M parameters
    "base": {"hidden_size": 512, "n_layers": 8, "n_heads": 8},  # GPU, ~25M parameters
}


@strict
class BehaviorConfig(PreTrainedConfig):
    """Hyper-parameters only; serialises to config.json.

    ``field_names`` fixes the order of the last axis of ``fields``; ``vocab_sizes`` gives each
    field's embedding table size (special indices included), as SequenceFeaturizer.vocab_sizes()
    returns it. ``max_len`` is the longest window of events (the BOS event takes one more
    position). ``field_loss_weights`` scales each field's NLL in both the training loss and the
    surprisal (missing fields weigh 1.0), so what is trained is what is scored.
    """

    model_type = MODEL_TYPE
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
    }

    field_names: list[str] = field(default_factory=list)
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 256
    dropout: float | int = 0.1
    field_loss_weights: dict[str, float | int] = field(default_factory=dict)
    sequence_loss_weight: float | int = 1.0
    # Set by fine-tuning: only then is the sequence head's probability a score worth showing.
    has_supervised_head: bool = False
    # Platt scaling of the head (see core.train.calibrate_head): sequence_logit is
    # head_logit_scale * head output + head_logit_bias. Fine-tuning draws a few legit windows
    # per fraud one and up-weights fraud, so the raw head overstates fraud; (1, 0) = as trained.
    head_logit_scale: float | int = 1.0
    head_logit_bias: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self, **kwargs: Any) -> None:
        if not self.field_names:
            self.field_names = list(self.vocab_sizes)
        kwargs.setdefault("attn_implementation", "sdpa")
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Part of `@strict` validation: called when the config is built or loaded."""
        missing = [f for f in self.field_names if f not in self.vocab_sizes]
        if missing:
            raise ValueError(f"vocab_sizes has no entry for field(s) {missing}")
        small = {f: v for f, v in self.vocab_sizes.items() if v < ABSENT_INDEX + 2}
        if small:
            raise ValueError(f"vocab sizes must include the special indices 0..2: {small}")
        extra = set(self.field_loss_weights) - set(self.field_names)
        if extra:
            raise ValueError(f"field_loss_weights names unknown field(s) {sorted(extra)}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads")
        if self.max_len < 1:
            raise ValueError("max_len must be >= 1")

    @classmethod
    def from_size(
        cls, name: SizeName, vocab_sizes: dict[str, int], **kwargs: Any
    ) -> BehaviorConfig:
        """A config of a named size: tiny (tests), small (CPU default), medium or base (GPU)."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model size {name!r}; choose from {sorted(MODEL_SIZES)}")
        params: dict[str, Any] = {**MODEL_SIZES[name], **kwargs}
        return cls(field_names=list(vocab_sizes), vocab_sizes=dict(vocab_sizes), **params)

    def field_weights(self) -> list[float]:
        return [float(self.field_loss_weights.get(f, 1.0)) for f in self.field_names]

    def backbone_config(self) -> GPT2Config:
        """The GPT-2 decoder this model wraps (built, not stored: config.json stays ours)."""
        return GPT2Config(
            vocab_size=1,  # unused: the model feeds inputs_embeds; keeps token ids in range
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            n_positions=self.max_len + 1,
            n_embd=self.hidden_size,
            n_layer=self.n_layers,
            n_head=self.n_heads,
            # GPT-2's own tanh-GELU in one fused kernel (gelu_new is five elementwise passes)
            activation_function="gelu_pytorch_tanh",
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
            initializer_range=self.initializer_range,
            use_cache=False,
            tie_word_embeddings=False,
            attn_implementation=self._attn_implementation or "sdpa",
        )


@dataclass
class BehaviorOutput(ModelOutput):
    """What one forward pass returns. Surprisal and losses are float32 whatever the autocast."""

    loss: torch.Tensor | None = None  # nll_loss (+ weighted BCE when labels were given)
    nll_loss: torch.Tensor | None = None  # mean surprisal over real events
    surprisal: torch.Tensor | None = None  # [B, L], 0 at padding
    field_nll: torch.Tensor | None = None  # [B, L, F] weighted; 0 at padding and absent fields
    field_logits: tuple[torch.Tensor, ...] | None = None  # per field [B, L, V_f], config order
    sequence_logit: torch.Tensor | None = None  # [B]: fraud logit, after the head's calibration
    hidden_states: torch.Tensor | None = None  # [B, L, H]: each event after the decoder
    pooled: torch.Tensor | None = None  # [B, 2H]: masked mean ‖ max, the sequence head's input


class BehaviorModel(PreTrainedModel):
    config: BehaviorConfig
    config_class = BehaviorConfig
    base_model_prefix = "behavior"
    main_input_name = "fields"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["GPT2Block"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: BehaviorConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        # One table per field, as separate named modules: attribution works per field.
        self.field_embeddings = nn.ModuleDict(
            {
                name: nn.Embedding(config.vocab_sizes[name], hidden, padding_idx=PAD_INDEX)
                for name in config.field_names
            }
        )
        self.bos_embedding = nn.Parameter(torch.zeros(hidden))
        self.backbone = GPT2Model(config.backbone_config())
        self.field_heads = nn.ModuleDict(
            {name: nn.Linear(hidden, config.vocab_sizes[name]) for name in config.field_names}
        )
        self.sequence_dropout = nn.Dropout(config.dropout)
        self.sequence_head = nn.Linear(2 * hidden, 1)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding (padding row zeroed) / LayerNorm
        if isinstance(module, BehaviorModel):
            init.normal_(module.bos_embedding, mean=0.0, std=self.config.initializer_range)

    @property
    def field_names(self) -> list[str]:
        return list(self.config.field_names)

    def embed_fields(self, fields: torch.Tensor) -> torch.Tensor:
        """Sum of the per-field embeddings: [B, L, F] indices -> [B, L, H]."""
        fields = fields.long()
        tables = list(self.field_embeddings.values())
        summed = tables[0](fields[..., 0])
        for j, emb in enumerate(tables[1:], start=1):
            summed = summed + emb(fields[..., j])
        return summed

    def forward(
        self,
        fields: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BehaviorOutput:
        """fields: [B, L, F] indices; attention_mask: [B, L] true at real events (default: any
        field non-zero); labels: [B] in {0, 1}, NaN for unlabelled sequences."""
        if fields.dim() != 3 or fields.shape[-1] != len(self.config.field_names):
            raise ValueError(
                f"fields must be [batch, length, {len(self.config.field_names)}], "
                f"got {tuple(fields.shape)}"
            )
        if attention_mask is None:
            attention_mask = (fields != PAD_INDEX).any(dim=-1)
        return self.forward_from_embeddings(
            self.embed_fields(fields), attention_mask, targets=fields, labels=labels
        )

    def forward_from_embeddings(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> BehaviorOutput:
        """The model past the field embeddings. Without ``targets`` (the observed field indices)
        there is no surprisal or NLL, only logits, hidden states and the sequence logit."""
        batch, length, hidden = inputs_embeds.shape
        if length > self.config.max_len:
            raise ValueError(
                f"sequence of {length} events exceeds max_len={self.config.max_len}; "
                "cut it with core.sequences.make_windows"
            )
        mask = attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)
        # A masked event's content must not leak through its own residual stream into the
        # prediction of the next event (masking is how a caller deletes events).
        inputs_embeds = inputs_embeds.masked_fill(~mask[..., None], 0.0)
        bos = self.bos_embedding.to(inputs_embeds.dtype).expand(batch, 1, hidden)
        embeds = torch.cat([bos, inputs_embeds], dim=1)
        # Right padding under causal attention is invisible to real events, so a prefix mask
        # needs no explicit mask: SDPA keeps its fast is_causal kernel (~2x on CPU). Padded
        # positions then compute garbage that everything below masks out.
        positions = torch.arange(length, device=mask.device)
        right_padded = bool((mask == (positions < mask.sum(dim=1, keepdim=True))).all())
        full_mask = None if right_padded else torch.cat([mask.new_ones(batch, 1), mask], dim=1)
        states = self.backbone(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state

        # The state after events < t predicts event t: BOS predicts the first event.
        before = states[:, :-1].contiguous()  # once, not once per head
        events = states[:, 1:]
        field_logits = tuple(head(before) for head in self.field_heads.values())

        pooled = _masked_mean_max(events, mask)
        sequence_logit = self.sequence_head(self.sequence_dropout(pooled)).squeeze(-1).float()
        if self.config.head_logit_scale != 1.0 or self.config.head_logit_bias != 0.0:
            sequence_logit = (
                self.config.head_logit_scale * sequence_logit + self.config.head_logit_bias
            )

        field_nll = surprisal = nll_loss = loss = None
        if targets is not None:
            field_nll = self._field_nll(field_logits, targets.to(inputs_embeds.device), mask)
            surprisal = field_nll.sum(dim=-1)
            nll_loss = surprisal.sum() / mask.sum().clamp(min=1)
            loss = nll_loss
            if labels is not None:
                labels = labels.to(device=sequence_logit.device, dtype=torch.float32)
                known = ~torch.isnan(labels)
                if bool(known.any()):
                    bce = F.binary_cross_entropy_with_logits(sequence_logit[known], labels[known])
                    loss = nll_loss + self.config.sequence_loss_weight * bce
        return BehaviorOutput(
            loss=loss,
            nll_loss=nll_loss,
            surprisal=surprisal,
            field_nll=field_nll,
            field_logits=field_logits,
            sequence_logit=sequence_logit,
            hidden_states=events,
            pooled=pooled,
        )

    def _field_nll(
        self, field_logits: tuple[torch.Tensor, ...], targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """[B, L, F] weighted NLL of the observed values, in float32 whatever the autocast."""
        targets = targets.long()
        per_field = []
        for j, logits in enumerate(field_logits):
            target = targets[..., j]
            nll = F.cross_entropy(
                logits.float().flatten(0, 1), target.flatten(), reduction="none"
            ).view_as(target)
            per_field.append(nll.masked_fill(target <= ABSENT_INDEX, 0.0))
        field_nll = torch.stack(per_field, dim=-1).masked_fill(~mask[..., None], 0.0)
        weights = self.config.field_weights()
        if any(w != 1.0 for w in weights):
            field_nll = field_nll * torch.tensor(weights, device=field_nll.device)
        return field_nll


def _masked_mean_max(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [B, 2H]: mean and max over real events (zeros for an empty sequence)."""
    m = mask[..., None]
    count = m.sum(dim=1).clamp(min=1).to(states.dtype)
    mean = states.masked_fill(~m, 0.0).sum(dim=1) / count
    low = torch.finfo(states.dtype).min
    peak = states.masked_fill(~m, low).max(dim=1).values
    peak = torch.where(mask.any(dim=1, keepdim=True), peak, torch.zeros_like(peak))
    return torch.cat([mean, peak], dim=-1)


AutoConfig.register(MODEL_TYPE, BehaviorConfig, exist_ok=True)
AutoModel.register(BehaviorConfig, BehaviorModel, exist_ok=True)
