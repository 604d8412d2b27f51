"""Per-GPU memory plan of a training run, from the target's `config.json` alone (no weights are read).

Parameter counts are exact: the target and the draft are built on the meta device. Activation and logit terms are
estimates of what one micro-batch keeps alive at its peak (bf16 compute with fp32 master weights on GPU, fp32
everywhere on CPU). `dspark plan` prints the plan; the recipe prints it at start-up and `shard_dense_target: auto`
shards the frozen target exactly when the replicated plan does not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import cast

import torch

from nemo_automodel_dspark.loss.chunked import default_chunk_rows
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.families import family_for
from nemo_automodel_dspark.model.layers import ContextBlockAttention

GIB = 2**30
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per trainable parameter
MASTER_BYTES = 4  # fp32 master weights and sharded fp32 gradients
GATHERED_LAYERS = 2  # FSDP2 keeps the running layer and the prefetched next one unsharded
RUNTIME_RESERVE_GIB = 2.0  # CUDA context + NCCL buffers, outside the caching allocator (GPU only)
# The recipe's objective is fused (loss/head.py): no [rows, V] logits exist, only a few fp32 [chunk_rows, V] scratch
# tensors at a time (draft and teacher logits, their softmaxes, dZ, the softcap's tanh).
LOGIT_CHUNKS = 6
# Unfused, per supervised row and vocabulary entry: draft logits U, Z = U + b and the teacher logits in the compute
# dtype, the fp32 log-probabilities of both, and dL/dZ in the compute dtype → 4·c + 8 bytes.
LOGIT_COPIES_COMPUTE, LOGIT_COPIES_FP32 = 4, 2
# Per draft layer and block row, what backward keeps: ~12 hidden-sized tensors (norm in/out, q/k/v/o, residuals,
# attention output) and 4 intermediate-sized ones (gate, up, act, product) in the compute dtype.
ACT_HIDDEN, ACT_INTERMEDIATE = 12, 4
_LOGITS_MEANING = {
    "fused": f"the recipe's; logits = {LOGIT_CHUNKS} fp32 [chunk_rows, V] scratch tensors, no [rows, V] tensor",
    "unfused": "logits = whole [rows, V] tensors, as an objective that materialises them would keep",
}


@dataclass(frozen=True)
class PlanSettings:
    """The run settings a plan depends on (a subset of the recipe config plus the hardware)."""

    gpus: int
    budget_gib: float
    device: str = "cuda"  # cuda → bf16 compute, fp32 master weights; cpu → fp32 everywhere
    strategy: str = "fsdp2"
    micro_batch_size: int = 1
    seq_length: int = 4096
    num_anchors: int = 512
    block_size: int = 7
    grad_accumulation_steps: int = 1
    defer_fsdp_grad_sync: bool = True
    activation_checkpointing: bool = False
    shard_dense_target: bool | str = "auto"
    fused_objective: bool = True  # the recipe's; False models an objective that materialises [rows, V] logits


@dataclass(frozen=True)
class ModelCounts:
    """Exact parameter counts of the target and the draft, from meta-device builds."""

    target_params: int
    target_largest_layer: int
    draft_trainable: int
    draft_frozen: int
    draft_root: int  # parameters outside the backbone layers (one FSDP2 unit, unsharded for the whole step)
    draft_largest_layer: int
    draft_layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # num_key_value_heads · head_dim of a draft layer
    vocab: int
    num_features: int


@dataclass
class MemoryPlan:
    """Per-GPU estimate in GiB, term by term, against the budget."""

    terms: dict[str, float]
    budget_gib: float
    target_sharded: bool
    replicated_gib: float  # the total with the target replicated (what `auto` compares against the budget)
    settings: PlanSettings
    advice: list[str] = field(default_factory=list)

    @property
    def per_gpu_gib(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.per_gpu_gib <= self.budget_gib

    @property
    def objective(self) -> str:
        """Which objective the `logits` term models: `fused` (the recipe's) or `unfused` (whole [rows, V] logits)."""
        return "fused" if self.settings.fused_objective else "unfused"

    def to_json(self) -> dict:
        return {
            "fits": self.fits,
            "per_gpu_gib": round(self.per_gpu_gib, 2),
            "budget_gib": self.budget_gib,
            "target_sharded": self.target_sharded,
            "replicated_gib": round(self.replicated_gib, 2),
            "gpus": self.settings.gpus,
            "objective": self.objective,
            "terms": {k: round(v, 3) for k, v in self.terms.items()},
            "advice": self.advice,
        }

    def table(self) -> str:
        s = self.settings
        how = f"sharded over {s.gpus}" if self.target_sharded else "replicated"
        lines = [
            f"memory plan per {s.device.upper()} ({s.gpus} x {self.budget_gib:.4g} GiB, target {how}, draft "
            f"{s.strategy}, micro-batch {s.micro_batch_size} x seq {s.seq_length}, {s.num_anchors} anchors x block "
            f"{s.block_size})"
        ]
        lines.append(f"  objective: {self.objective} ({_LOGITS_MEANING[self.objective]})")
        lines += [f"  {name:<24} {_size(gib)}" for name, gib in self.terms.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<24} {_size(self.per_gpu_gib)} of {self.budget_gib:.4g} GiB: {verdict}")
        lines += [f"  - {tip}" for tip in self.advice]
        return "\n".join(lines)


def _size(gib: float) -> str:
    return f"{gib:9.2f} GiB" if gib >= 1 or gib == 0 else f"{gib * 1024:9.2f} MiB"


def _params(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def count_models(target_config, dspark: DSparkConfig) -> ModelCounts:
    """Build the target and its draft on the meta device and count their parameters (seconds, no memory)."""
    from nemo_automodel_dspark.model.drafter import DSparkDrafter

    family = family_for(target_config)
    cls = family.model_class(target_config)
    with torch.device("meta"):  # Auto classes build with from_config, concrete ones with their constructor
        target = cls.from_config(target_config) if hasattr(cls, "from_config") else cls(target_config)
        draft = DSparkDrafter(target_config, dspark)
    layers = family.decoder_parts(target).layers
    text = draft.text_config
    attn = cast(ContextBlockAttention, draft.layers[0].self_attn)
    in_layers = sum(_params(layer) for layer in draft.layers)
    return ModelCounts(
        target_params=_params(target),
        target_largest_layer=max(_params(layer) for layer in layers),
        draft_trainable=_params(draft, trainable=True),
        draft_frozen=_params(draft, trainable=False),
        draft_root=_params(draft) - in_layers,
        draft_largest_layer=max(_params(layer) for layer in draft.layers),
        draft_layers=len(draft.layers),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        kv_dim=attn.kv_heads * attn.head_dim,
        vocab=text.vocab_size,
        num_features=len(draft.dspark.target_layer_ids or []),  # resolved: the default spread when not configured
    )


def _draft_terms(c: ModelCounts, s: PlanSettings, compute: int) -> dict[str, float]:
    """Draft parameters, gradients, optimizer state and the frozen embedding + lm_head, in bytes."""
    shards = s.gpus if s.strategy == "fsdp2" else 1
    grads = c.draft_trainable * MASTER_BYTES / shards
    fsdp = s.strategy == "fsdp2" and s.gpus > 1
    if fsdp and s.defer_fsdp_grad_sync and s.grad_accumulation_steps > 1:
        grads += c.draft_trainable * compute  # unsharded gradients accumulate until the last micro-batch
    unsharded = (c.draft_root + GATHERED_LAYERS * c.draft_largest_layer) * compute if fsdp and compute < 4 else 0
    return {
        "draft_params": c.draft_trainable * MASTER_BYTES / shards,
        "draft_grads": grads,
        "optimizer_state": c.draft_trainable * ADAM_STATE_BYTES / shards,
        "frozen_embed_lm_head": c.draft_frozen * MASTER_BYTES / shards,
        "draft_unsharded_params": unsharded,
    }


def _activation_bytes(c: ModelCounts, s: PlanSettings, compute: int, target_bytes: int) -> float:
    """Captured target features + context rows + what the draft backbone keeps for backward."""
    seq = s.micro_batch_size * s.seq_length
    rows = s.micro_batch_size * s.num_anchors * s.block_size
    features = seq * (2 * c.num_features + 1) * c.hidden * target_bytes  # hooked outputs, their concat, final norm
    target_layer = seq * (4 * c.hidden + 2 * c.intermediate) * target_bytes  # one no-grad layer in flight
    per_layer = rows * (ACT_HIDDEN * c.hidden + ACT_INTERMEDIATE * c.intermediate) * compute
    per_layer += (seq + rows) * (c.hidden + 2 * c.kv_dim) * compute  # context rows and their keys/values
    if s.activation_checkpointing:  # each layer keeps its input; one layer's activations are rebuilt at a time
        backbone = rows * c.hidden * compute * c.draft_layers + per_layer
    else:
        backbone = per_layer * c.draft_layers
    return features + target_layer + backbone


def _logit_bytes(c: ModelCounts, s: PlanSettings, compute: int) -> float:
    """Vocabulary-sized memory of the objective: fused chunks, or whole [rows, V] tensors when unfused."""
    rows = s.micro_batch_size * s.num_anchors * s.block_size
    if s.fused_objective:
        return LOGIT_CHUNKS * min(rows, default_chunk_rows(c.vocab)) * c.vocab * 4
    return rows * c.vocab * (LOGIT_COPIES_COMPUTE * compute + LOGIT_COPIES_FP32 * 4)


def estimate(c: ModelCounts, s: PlanSettings, target_sharded: bool) -> dict[str, float]:
    """Every per-GPU term in GiB for one choice of target sharding."""
    compute = 2 if s.device == "cuda" else 4
    target_bytes = compute  # the target is loaded in the compute dtype (bf16 on GPU, fp32 on CPU)
    sharded = target_sharded and s.gpus > 1
    terms = {
        "target_weights": c.target_params * target_bytes / (s.gpus if sharded else 1),
        "target_layer_gather": GATHERED_LAYERS * c.target_largest_layer * target_bytes if sharded else 0.0,
        **_draft_terms(c, s, compute),
        "activations": _activation_bytes(c, s, compute, target_bytes),
        "logits": _logit_bytes(c, s, compute),
        "runtime_reserve": RUNTIME_RESERVE_GIB * GIB if s.device == "cuda" else 0.0,
    }
    return {k: v / GIB for k, v in terms.items()}


def choose_sharding(setting: bool | str, replicated_fits: bool) -> bool:
    """`true`/`false` as given; `auto` shards exactly when the replicated plan does not fit."""
    if isinstance(setting, bool):
        return setting
    return not replicated_fits


def _advice(plan: MemoryPlan, c: ModelCounts) -> list[str]:
    s, t = plan.settings, plan.terms
    if plan.fits:
        return []
    tips = []
    if not plan.target_sharded and s.gpus > 1:
        tips.append("shard the target: recipe_args.shard_dense_target: true")
    if plan.target_sharded:
        per_gpu_rest = plan.per_gpu_gib - t["target_weights"]
        room = plan.budget_gib - per_gpu_rest
        if room > 0:
            need = -(-c.target_params * (2 if s.device == "cuda" else 4) // int(room * GIB))
            tips.append(f"more GPUs: the sharded target needs about {need} of them at this budget")
        else:
            tips.append("more GPUs do not help: everything but the target weights already exceeds the budget")
    if t["logits"] + t["activations"] > 0.2 * plan.budget_gib:
        tips.append(f"fewer anchors (recipe_args.num_anchors, now {s.num_anchors}): logits and activations follow it")
        if s.micro_batch_size > 1:
            tips.append(f"smaller micro-batch (recipe_args.micro_batch_size, now {s.micro_batch_size})")
    if s.strategy == "fsdp2" and s.defer_fsdp_grad_sync and s.grad_accumulation_steps > 1:
        tips.append("distributed.defer_fsdp_grad_sync: false (keeps gradients sharded between micro-batches)")
    if not s.activation_checkpointing:
        tips.append("distributed.activation_checkpointing: true (recomputes the draft layers in backward)")
    return tips


def make_plan(c: ModelCounts, s: PlanSettings) -> MemoryPlan:
    """The plan for the configured sharding (`auto` resolved against the replicated estimate)."""
    replicated = estimate(c, s, target_sharded=False)
    replicated_gib = sum(replicated.values())
    sharded = choose_sharding(s.shard_dense_target, replicated_gib <= s.budget_gib) and s.gpus > 1
    terms = estimate(c, s, target_sharded=True) if sharded else replicated
    plan = MemoryPlan(terms, s.budget_gib, sharded, replicated_gib, s)
    plan.advice = _advice(plan, c)
    return plan


def parse_gib(text: str) -> float:
    """'80GiB', '80GB' (decimal), '80G' or '80' → GiB."""
    t = text.strip()
    units = {"gib": 1.0, "gb": 1e9 / GIB, "g": 1.0, "": 1.0}
    for unit in sorted(units, key=len, reverse=True):
        if t.lower().endswith(unit):
            number = t[: len(t) - len(unit)] if unit else t
            try:
                return float(number) * units[unit]
            except ValueError:
                break
    raise ValueError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 141GB or 80")


def dumps(plan: MemoryPlan) -> str:
    return json.dumps(plan.to_json())


def settings_for(config, gpus: int, budget_gib: float, device: str) -> PlanSettings:
    """PlanSettings from a parsed recipe config (`DSparkRecipeConfig`) and the hardware."""
    args, draft, dist = config.recipe_args, config.draft, config.distributed
    return PlanSettings(
        gpus=gpus,
        budget_gib=budget_gib,
        device=device,
        strategy=dist.strategy,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        num_anchors=draft.num_anchors,
        block_size=draft.block_size,
        grad_accumulation_steps=args.grad_accumulation_steps,
        defer_fsdp_grad_sync=dist.defer_fsdp_grad_sync,
        activation_checkpointing=dist.activation_checkpointing,
        shard_dense_target=args.shard_dense_target,
    )


def plan_for_config(config, target_config, gpus: int, budget_gib: float, device: str = "cuda") -> MemoryPlan:
    """The plan of a parsed recipe config against its target's HF config."""
    counts = count_models(target_config, config.draft)
    return make_plan(counts, settings_for(config, gpus, budget_gib, device))


def device_memory_gib(device: torch.device, local_ranks: int = 1) -> float:
    """Total memory of a GPU, or this node's RAM divided among its ranks on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / max(local_ranks, 1)


def run_plan_command(args) -> int:
    """`dspark plan -c cfg.yaml --gpus N --gpu-memory 80GiB [--json] [--section.key=value ...]`."""
    from nemo_automodel_dspark.errors import ToolError, require_file
    from nemo_automodel_dspark.recipe.config import ConfigError, RecipeArgs, load_config, parse_config
    from nemo_automodel_dspark.target.loading import load_target_config

    require_file(args.config, "-c")
    if args.gpus < 1:
        raise ToolError(f"--gpus {args.gpus}: must be >= 1")
    try:
        budget = parse_gib(args.gpu_memory)
        config = parse_config(load_config(["-c", args.config, *args.overrides]))
    except (ConfigError, ValueError) as err:
        raise ToolError(str(err)) from err
    run = config.recipe_args
    key = RecipeArgs.key("target_model_name_or_path")
    target_config = load_target_config(run.target_model_name_or_path, key, run.trust_remote_code)
    plan = plan_for_config(config, target_config, args.gpus, budget)
    print(dumps(plan) if args.json else plan.table())
    return 0
