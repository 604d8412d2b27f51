"""Typed recipe configuration (SPEC §6): parsed and validated once, defaults in one place.

The upstream NeMo AutoModel DSpark YAMLs load unchanged. An unknown key is an error suggesting the nearest valid
key; a known upstream key this plugin does not implement is an error saying so (unless it holds its no-op value).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from nemo_automodel_dspark.recipe.serving_checks import check_serving


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the dotted key."""


@dataclass
class RecipeArgs:
    target_model_name_or_path: str
    train_data_path: str
    output_dir: str
    seq_length: int
    mask_token_id: int
    val_data_path: str | None = None
    train_split: str = "train"
    val_split: str = "train"
    micro_batch_size: int = 1
    grad_accumulation_steps: int = 1
    num_workers: int = 0
    num_epochs: int = 1
    max_steps: int | None = None
    draft_num_hidden_layers: int = 5
    block_size: int = 7
    num_anchors: int = 512
    target_layer_ids: list[int] | None = None
    serve_with: list[str] | None = None  # engines the draft must load in (export/engines.py); unset = warn
    freeze_embeddings: bool = True
    attention_backend: str = "flex_attention"
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    confidence_head_alpha: float = 1.0
    confidence_head_with_markov: bool = True
    ce_loss_alpha: float = 0.1
    l1_loss_alpha: float = 0.9
    loss_decay_gamma: float | None = 4.0
    trust_remote_code: bool = False
    shuffle_seed: int = 42
    log_every_steps: int = 10
    val_every_steps: int | None = None
    max_grad_norm: float | None = 1.0
    overwrite_output_dir: bool = False  # a new run into a folder holding a run moves the old one aside (never deletes)
    max_skipped_steps: int = 0  # non-finite steps skipped (and counted) before the run stops; 0 = stop at the first
    mask_reasoning_content: bool = False
    chat_template: str | None = None
    ckpt_every_steps: int | None = None
    eval_decode: EvalDecodeConfig | None = None
    shard_dense_target: bool | str = "auto"  # true | false | auto (shard when the replicated plan does not fit)
    memory_budget_gib: float | None = None  # per device, for the plan and `auto`; default: the device's memory
    draft_weights_path: str | None = None  # warm-start from a servable draft folder
    packed_sequence_size: int = 0  # > 0: pack whole documents into rows of this many tokens (recipe/batching.py)
    max_tokens_per_batch: int = 0  # > 0: micro-batches of similar-length rows, rows × longest ≤ this
    tokenized_cache: bool = True  # tokenise once into a memory-mapped Arrow cache (data/cache.py), reused by restarts
    tokenized_cache_dir: str | None = None  # default: data.cache.default_cache_root() ($DSPARK_CACHE_DIR, ~/.cache/…)
    tokenize_num_proc: int = 4  # worker processes that build the cache


@dataclass
class EvalDecodeConfig:
    """Real speculative decoding on rank 0 every `every_steps` steps (logged as `decode/*`)."""

    every_steps: int
    data_path: str
    num_prompts: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.0


@dataclass
class OptimizerConfig:
    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.1
    eps: float = 1e-8
    target: Any = None  # `_target_`: an optimizer class (or dotted path) used instead of AdamW
    extra: dict = field(default_factory=dict)  # other kwargs passed to an explicit `_target_`


@dataclass
class CheckpointConfig:
    enabled: bool = True
    checkpoint_dir: str | None = None  # default: <output_dir>/checkpoints
    model_save_format: str = "safetensors"
    save_consolidated: str = "final"  # final | every (true means every, as upstream)
    ckpt_every_steps: int | None = None
    restore_from: str | None = None  # path | LATEST | null
    keep_last_n: int | None = None  # keep the newest N checkpoints (pruned once a newer one is complete); null = all


@dataclass
class DistConfig:
    backend: str = "nccl"  # falls back to gloo without CUDA
    timeout_minutes: int = 30
    strategy: str = "fsdp2"  # fsdp2 | ddp
    defer_fsdp_grad_sync: bool = True
    activation_checkpointing: bool = False  # recompute the draft backbone layers in backward


@dataclass
class DSparkRecipeConfig:
    recipe_args: RecipeArgs
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    dist: DistConfig
    recipe: str | None = None


# Upstream keys we accept only with their no-op value (anything else is refused with a clear message).
_UNIMPLEMENTED_RECIPE_ARGS = {
    "mask_generation_prompt": False,
    "cached_target_path": None,
    "multimodal": False,
    "target_force_hf": False,
    "target_attn_implementation": None,
    "target_num_hidden_layers": None,
    "target_attn_backend": None,
    "target_dispatcher": None,
    "target_experts": None,
    "target_enable_fsdp_optimizations": None,
    "confidence_head_stop_gradient": False,
    "save_checkpoint_every_epoch": False,
}
_UNIMPLEMENTED_DISTRIBUTED = {
    "cp_size": 1,
    "tp_size": 1,
    "pp_size": 1,
    "ep_size": 1,
    "dp_replicate_size": 1,
    "dp_size": None,
}
_UNIMPLEMENTED_CHECKPOINT = {
    "model_cache_dir": None,
    "model_repo_id": None,
    "is_peft": False,
    "model_state_dict_keys": None,
    "is_async": False,
    "max_recent_checkpoints": None,
}
_UNIMPLEMENTED_SECTIONS = ("wandb", "fp8", "compile", "peft", "dataset", "val_dataset", "model")
_SECTIONS = ("recipe", "dist_env", "distributed", "recipe_args", "optimizer", "checkpoint", *_UNIMPLEMENTED_SECTIONS)


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls) if not f.metadata.get("internal")]


def _unknown(key: str, valid: list[str], section: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{section}.{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{section}.{key}'{hint}")


def _check_section(section: str, values: dict, valid: list[str], unimplemented: dict) -> dict:
    """Split a section into accepted keys; refuse unknown and non-trivial unimplemented ones."""
    kept = {}
    for key, value in values.items():
        if key in unimplemented:
            if value != unimplemented[key] and value is not None:
                raise ConfigError(
                    f"'{section}.{key}' is an upstream NeMo AutoModel option this plugin does not "
                    f"implement (got {value!r}); remove it or set it to {unimplemented[key]!r}"
                )
        elif key in valid:
            kept[key] = value
        else:
            raise _unknown(key, valid + list(unimplemented), section)
    return kept


def _require(section: str, values: dict, names: list[str]) -> None:
    for name in names:
        if values.get(name) is None:
            raise ConfigError(f"'{section}.{name}' is required")


def _typed(section: str, cls, values: dict):
    try:
        obj = cls(**values)
    except TypeError as err:
        raise ConfigError(f"{section}: {err}") from err
    for f in fields(cls):
        value = getattr(obj, f.name)
        if f.type in ("int", "int | None") and value is not None and not isinstance(value, int):
            raise ConfigError(f"'{section}.{f.name}' must be an integer, got {value!r}")
    return obj


def _as_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a mapping, got {type(cfg).__name__}")
    return {k: _as_dict(v) if hasattr(v, "to_dict") else v for k, v in cfg.items()}


def _parse_recipe_args(values: dict) -> RecipeArgs:
    kept = _check_section("recipe_args", values, _names(RecipeArgs), _UNIMPLEMENTED_RECIPE_ARGS)
    _require(
        "recipe_args",
        kept,
        ["target_model_name_or_path", "train_data_path", "output_dir", "seq_length", "mask_token_id"],
    )
    for key in ("train_split", "val_split"):
        if kept.get(key) is None:
            kept.pop(key, None)
    if kept.get("eval_decode") is not None:
        block = _check_section("recipe_args.eval_decode", _as_dict(kept["eval_decode"]), _names(EvalDecodeConfig), {})
        _require("recipe_args.eval_decode", block, ["every_steps", "data_path"])
        kept["eval_decode"] = _typed("recipe_args.eval_decode", EvalDecodeConfig, block)
    args = _typed("recipe_args", RecipeArgs, kept)
    for key in (
        "seq_length",
        "micro_batch_size",
        "grad_accumulation_steps",
        "num_epochs",
        "log_every_steps",
        "tokenize_num_proc",
    ):
        if getattr(args, key) < 1:
            raise ConfigError(f"'recipe_args.{key}' must be >= 1, got {getattr(args, key)}")
    for key in ("max_steps", "val_every_steps", "ckpt_every_steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"'recipe_args.{key}' must be >= 1 or null, got {getattr(args, key)}")
    if args.max_skipped_steps < 0:
        raise ConfigError(f"'recipe_args.max_skipped_steps' must be >= 0, got {args.max_skipped_steps}")
    if args.confidence_head_alpha < 0:
        raise ConfigError("'recipe_args.confidence_head_alpha' must be >= 0")
    _check_sharding(args)
    _check_batching(args)
    if isinstance(args.serve_with, str):  # `serve_with: vllm` means [vllm]
        args.serve_with = [args.serve_with]
    check_serving(args, error=ConfigError)  # the option-only engine rules; the target's depth is checked at setup
    return args


def _check_sharding(args: RecipeArgs) -> None:
    """`shard_dense_target` is true, false or auto; a sharded target cannot run rank-0-only decoding."""
    value = args.shard_dense_target
    if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
        value = {"true": True, "false": False}.get(value.lower(), "auto")
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"'recipe_args.shard_dense_target' must be true, false or auto, got {value!r}")
    args.shard_dense_target = value
    if value is True and args.eval_decode is not None:
        raise ConfigError(
            "'recipe_args.eval_decode' decodes on rank 0 alone and needs a replicated target; "
            "set recipe_args.shard_dense_target: false (or remove eval_decode)"
        )
    if args.memory_budget_gib is not None and not args.memory_budget_gib > 0:
        raise ConfigError(f"'recipe_args.memory_budget_gib' must be > 0, got {args.memory_budget_gib}")


def _check_batching(args: RecipeArgs) -> None:
    """Packing and token budgets hold whole rows (at most seq_length tokens each) and exclude each other."""
    for key in ("packed_sequence_size", "max_tokens_per_batch"):
        value = getattr(args, key)
        if value and value < args.seq_length:
            raise ConfigError(
                f"'recipe_args.{key}' must be 0 (off) or >= seq_length={args.seq_length} so that every row fits, "
                f"got {value}"
            )
        if value < 0:
            raise ConfigError(f"'recipe_args.{key}' must be 0 (off) or >= seq_length, got {value}")
    if args.packed_sequence_size and args.max_tokens_per_batch:
        raise ConfigError(
            "'recipe_args.packed_sequence_size' and 'recipe_args.max_tokens_per_batch' exclude each other; set one to 0"
        )


def _parse_optimizer(values: dict) -> OptimizerConfig:
    values = dict(values)
    target = values.pop("_target_", None)
    _require("optimizer", values, ["lr"])
    known = [n for n in _names(OptimizerConfig) if n not in ("target", "extra")]
    if target is None:
        kept = _check_section("optimizer", values, known, {})
        return _typed("optimizer", OptimizerConfig, kept)
    schedule = {k: values.pop(k) for k in ("warmup_ratio", "min_lr_ratio") if k in values}
    return OptimizerConfig(lr=values.pop("lr"), target=target, extra=values, **schedule)


def _parse_checkpoint(values: dict) -> CheckpointConfig:
    kept = _check_section("checkpoint", values, _names(CheckpointConfig), _UNIMPLEMENTED_CHECKPOINT)
    consolidated = kept.get("save_consolidated", "final")
    if consolidated is True:
        consolidated = "every"
    if consolidated not in ("final", "every"):
        raise ConfigError(f"'checkpoint.save_consolidated' must be final, every or true, got {consolidated!r}")
    kept["save_consolidated"] = consolidated
    if kept.get("model_save_format", "safetensors") != "safetensors":
        raise ConfigError("'checkpoint.model_save_format': only safetensors is implemented")
    out = _typed("checkpoint", CheckpointConfig, kept)
    if out.keep_last_n is not None and out.keep_last_n < 1:
        raise ConfigError(f"'checkpoint.keep_last_n' must be >= 1 or null, got {out.keep_last_n}")
    return out


def _parse_dist(dist_env: dict, distributed: dict) -> DistConfig:
    env = _check_section("dist_env", dist_env, ["backend", "timeout_minutes"], {})
    dist = _check_section(
        "distributed",
        distributed,
        ["strategy", "defer_fsdp_grad_sync", "activation_checkpointing"],
        _UNIMPLEMENTED_DISTRIBUTED,
    )
    out = _typed("distributed", DistConfig, {**env, **dist})
    if out.strategy not in ("fsdp2", "ddp"):
        raise ConfigError(f"'distributed.strategy' must be fsdp2 or ddp, got {out.strategy!r}")
    return out


def parse_config(cfg: Any) -> DSparkRecipeConfig:
    """Validate a whole YAML (dict or AutoModel ConfigNode) into typed sections; raises ConfigError naming the key."""
    raw = _as_dict(cfg)
    for key in raw:
        if key not in _SECTIONS:
            raise _unknown(key, list(_SECTIONS), "<top level>")
    for key in _UNIMPLEMENTED_SECTIONS:
        if raw.get(key):
            raise ConfigError(
                f"'{key}' is an upstream NeMo AutoModel section this plugin does not implement; "
                "remove it (metrics are written to <output_dir>/dspark_train_metrics.jsonl)"
            )
    for section in ("recipe_args", "optimizer"):
        if section not in raw:
            raise ConfigError(f"'{section}' section is required")
    args = _parse_recipe_args(_as_dict(raw["recipe_args"]))
    checkpoint = _parse_checkpoint(_as_dict(raw.get("checkpoint")))
    if args.ckpt_every_steps is not None:
        if checkpoint.ckpt_every_steps not in (None, args.ckpt_every_steps):
            raise ConfigError("'recipe_args.ckpt_every_steps' and 'checkpoint.ckpt_every_steps' disagree")
        checkpoint.ckpt_every_steps = args.ckpt_every_steps
    recipe = raw.get("recipe")
    return DSparkRecipeConfig(
        recipe_args=args,
        optimizer=_parse_optimizer(_as_dict(raw["optimizer"])),
        checkpoint=checkpoint,
        dist=_parse_dist(_as_dict(raw.get("dist_env")), _as_dict(raw.get("distributed"))),
        recipe=recipe if isinstance(recipe, str) or recipe is None else str(recipe),
    )
