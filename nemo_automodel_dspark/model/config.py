"""The DSpark drafter's own options (SPEC §1), validated once; the target's architecture comes from its HF config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
ATTENTION_BACKENDS = ("flex_attention", "sdpa")


@dataclass
class DSparkConfig:
    """Drafter options; `target_layer_ids=None` means the even spread of SPEC §2, resolved against the target."""

    mask_token_id: int
    draft_num_hidden_layers: int = 5
    block_size: int = 7
    num_anchors: int = 512
    target_layer_ids: list[int] | None = None
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    freeze_embeddings: bool = True
    attention_backend: str = "sdpa"
    confidence_temperatures: list[float] | None = field(default=None)

    def __post_init__(self) -> None:
        self._check_positive("draft_num_hidden_layers", self.draft_num_hidden_layers)
        self._check_positive("block_size", self.block_size)
        self._check_positive("num_anchors", self.num_anchors)
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0 (0 disables the Markov head), got {self.markov_rank}")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {self.markov_head_type!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError(
                "confidence_head_with_markov: true needs the Markov embedding, but markov_rank is 0; "
                "set confidence_head_with_markov: false, or markov_rank > 0, or confidence_head_alpha: 0"
            )
        if self.target_layer_ids is not None:
            self.target_layer_ids = [int(i) for i in self.target_layer_ids]

    @staticmethod
    def _check_positive(name: str, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """mask_token_id must be a real row of the (shared) embedding table."""
        if not 0 <= self.mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id must be in [0, {vocab_size}) for this target, got {self.mask_token_id}")

    def to_dict(self) -> dict:
        return asdict(self)
