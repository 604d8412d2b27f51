"""Typed recipe configuration (SPEC §6): every key declared once, checked when the YAML is parsed.

`recipe_args` fills three objects: `RecipeArgs` (the run), `DSparkConfig` (the drafter, model/config.py) and
`LossConfig` (the objective, loss/config.py); the other sections fill one each. Each key is one `option(...)`
field (type, default, range, allowed values; see options.py), so adding a key is adding a field to the class
that uses it. The upstream NeMo AutoModel DSpark YAMLs load unchanged. An unknown key is an error suggesting the
nearest valid key; a known upstream key this plugin does not implement is an error saying so (unless it holds
its no-op value). The YAML file and its `--section.key=value` overrides are read by `config_file.py`.

This module and config_file.py import only the standard library and PyYAML (plus the option classes), so a bad
option is reported before torch, NeMo AutoModel, the tokenizer, the data or any weights load.
"""

from __future__ import annotations

import difflib
import sys
import typing
from dataclasses import dataclass
from typing import Any, NoReturn

from nemo_automodel_dspark.errors import report_user_error
from nemo_automodel_dspark.loss.config import LossConfig
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.options import ConfigError, Options, build, option, rule
from nemo_automodel_dspark.recipe.config_file import load_config
from nemo_automodel_dspark.recipe.serving_checks import check_serving

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DSparkRecipeConfig",
    "DistEnvConfig",
    "DistributedConfig",
    "EvalDecodeConfig",
    "OptimizerConfig",
    "RecipeArgs",
    "config_or_exit",
    "exit_with_error",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True, kw_only=True)
class EvalDecodeConfig(Options):
    """Real speculative decoding on rank 0 every `every_steps` steps (logged as `decode/*`)."""

    SECTION = "recipe_args.eval_decode"

    every_steps: int = option(ge=1)
    data_path: str = option()
    num_prompts: int = option(8, ge=1)
    max_new_tokens: int = option(64, ge=1)
    temperature: float = option(0.0, ge=0)


@dataclass(frozen=True, kw_only=True)
class RecipeArgs(Options):
    """The run: data, batch layout, schedule, cadences (draft and loss options live in their own classes)."""

    SECTION = "recipe_args"

    target_model_name_or_path: str = option(doc="HF model directory or hub id of the frozen target")
    train_data_path: str = option(doc="JSONL file or HF dataset of chat rows")
    output_dir: str = option(doc="metrics JSONL (and checkpoints, by default) go here")
    seq_length: int = option(ge=1)
    val_data_path: str | None = option(None)
    train_split: str = option("train")
    val_split: str = option("train")
    micro_batch_size: int = option(1, ge=1)
    grad_accumulation_steps: int = option(1, ge=1)
    num_epochs: int = option(1, ge=1)
    max_steps: int | None = option(None, ge=1, doc="stop after this many optimizer steps (null: num_epochs)")
    trust_remote_code: bool = option(False)
    shuffle_seed: int = option(42, ge=0, doc="data order, anchors and the draft's initial weights")
    log_every_steps: int = option(10, ge=1)
    val_every_steps: int | None = option(None, ge=1, doc="also validate every N steps (always at each epoch end)")
    max_grad_norm: float | None = option(1.0, gt=0, doc="null: no clipping")
    serve_with: list[str] | None = option(None, doc="engines the draft must load in (export/engines.py); null: warn")
    overwrite_output_dir: bool = option(False, doc="a new run into a folder holding a run moves the old one aside")
    max_skipped_steps: int = option(0, ge=0, doc="refused (diverged) steps skipped and counted before the run stops")
    divergence_factor: float | None = option(
        100.0, gt=1, doc="refuse a step whose loss is above this x the recent median (recipe/guards.py); null: off"
    )
    mask_reasoning_content: bool = option(False)
    chat_template: str | None = option(None, doc="Jinja template used instead of the tokenizer's")
    eval_decode: EvalDecodeConfig | None = option(None)
    shard_dense_target: bool | str = option(
        "auto", choices=(True, False, "auto"), doc="auto: shard the target when the replicated plan does not fit"
    )
    memory_budget_gib: float | None = option(None, gt=0, doc="per device, for the plan and `auto`; null: the device's")
    draft_weights_path: str | None = option(None, doc="warm-start from a servable draft folder")
    packed_sequence_size: int = option(0, doc="> 0: pack whole documents into rows of this many tokens")
    max_tokens_per_batch: int = option(0, doc="> 0: micro-batches of similar-length rows, rows x longest <= this")
    tokenized_cache: bool = option(True, doc="tokenise once into a memory-mapped Arrow cache reused by restarts")
    tokenized_cache_dir: str | None = option(None, doc="null: $DSPARK_CACHE_DIR or ~/.cache/nemo_automodel_dspark")
    tokenize_num_proc: int = option(4, ge=1, doc="processes that build the tokenised cache (at most the CPUs)")

    def rules(self) -> None:
        rule(
            self.val_every_steps is None or self.val_data_path is not None,
            f"'{self.key('val_every_steps')}' needs '{self.key('val_data_path')}'",
        )
        for name in ("packed_sequence_size", "max_tokens_per_batch"):  # whole rows (<= seq_length tokens) must fit
            value = getattr(self, name)
            rule(
                value == 0 or value >= self.seq_length,
                f"'{self.key(name)}' must be 0 (off) or >= seq_length={self.seq_length} so that every row fits, "
                f"got {value}",
            )
        rule(
            not (self.shard_dense_target is True and self.eval_decode is not None),
            f"'{self.key('eval_decode')}' decodes on rank 0 alone and needs a replicated target; "
            f"set {self.key('shard_dense_target')}: false (or remove eval_decode)",
        )
        rule(
            not (self.packed_sequence_size and self.max_tokens_per_batch),
            f"'{self.key('packed_sequence_size')}' and '{self.key('max_tokens_per_batch')}' exclude each other; "
            "set one to 0",
        )


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig(Options):
    SECTION = "optimizer"

    lr: float = option(gt=0)
    betas: tuple[float, float] = option((0.9, 0.95), ge=0, lt=1)
    weight_decay: float = option(0.0, ge=0)
    warmup_ratio: float = option(0.04, ge=0, le=1)
    min_lr_ratio: float = option(0.1, ge=0, le=1)
    eps: float = option(1e-8, gt=0)
    target: Any = option(None, from_yaml=False, doc="`_target_`: optimizer class (or dotted path) instead of AdamW")
    extra: dict | None = option(None, from_yaml=False, doc="with `_target_`: the other keys, passed to it as kwargs")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(Options):
    """Every checkpoint holds the consolidated (servable) draft, so upstream `save_consolidated` is always true."""

    SECTION = "checkpoint"

    enabled: bool = option(True)
    checkpoint_dir: str | None = option(None, doc="null: <output_dir>/checkpoints")
    model_save_format: str = option("safetensors", choices=("safetensors",))
    ckpt_every_steps: int | None = option(None, ge=1, doc="null: only at the end of the run")
    restore_from: str | None = option(None, doc="a checkpoint folder, LATEST, or null")
    keep_last_n: int | None = option(
        None, ge=1, doc="keep the newest N checkpoints (pruned after a newer one); null: all"
    )


@dataclass(frozen=True, kw_only=True)
class DistEnvConfig(Options):
    SECTION = "dist_env"

    backend: str = option("nccl", choices=("nccl", "gloo"), doc="gloo is used without CUDA")
    timeout_minutes: int = option(30, ge=1)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig(Options):
    SECTION = "distributed"

    strategy: str = option("fsdp2", choices=("fsdp2", "ddp"))
    defer_fsdp_grad_sync: bool = option(True)
    activation_checkpointing: bool = option(False, doc="recompute the draft backbone layers in backward")


@dataclass(frozen=True)
class DSparkRecipeConfig:
    """The whole parsed YAML: one typed object per concern, none mutated after parsing."""

    recipe_args: RecipeArgs
    draft: DSparkConfig
    loss: LossConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    dist_env: DistEnvConfig
    distributed: DistributedConfig
    recipe: str | None = None


# The option classes each YAML section fills (a key belongs to the class that declares it).
_SECTIONS: dict[str, tuple[type[Options], ...]] = {
    "recipe_args": (RecipeArgs, DSparkConfig, LossConfig),
    "optimizer": (OptimizerConfig,),
    "checkpoint": (CheckpointConfig,),
    "dist_env": (DistEnvConfig,),
    "distributed": (DistributedConfig,),
}

_ANY = object()  # an upstream key whose every value is a no-op here

# Upstream keys accepted only with their no-op value (anything else is refused with a clear message).
_UPSTREAM_NOOPS: dict[str, dict[str, Any]] = {
    "recipe_args": {
        "num_workers": _ANY,  # rows are tokenised once up front: there are no loader workers
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
    },
    "distributed": {
        "cp_size": 1,
        "tp_size": 1,
        "pp_size": 1,
        "ep_size": 1,
        "dp_replicate_size": 1,
        "dp_size": None,
    },
    "checkpoint": {
        "save_consolidated": True,
        "model_cache_dir": None,
        "model_repo_id": None,
        "is_peft": False,
        "model_state_dict_keys": None,
        "is_async": False,
        "max_recent_checkpoints": None,
    },
}
_UPSTREAM_SECTIONS = ("wandb", "fp8", "compile", "peft", "dataset", "val_dataset", "model")
_TOP_LEVEL = ("recipe", *_SECTIONS, *_UPSTREAM_SECTIONS)


# ---------------------------------------------------------------------------------------------------- parsing


def _as_dict(cfg: Any, where: str) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    rule(isinstance(cfg, dict), f"'{where}' must be a mapping of keys, got {cfg!r}")
    return dict(cfg)


def _unknown(key: str, valid: list[str], section: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{section}.{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{section}.{key}'{hint}")


def _check_upstream(section: str, key: str, value: Any) -> None:
    noop = _UPSTREAM_NOOPS[section][key]
    if value is not None and noop is not _ANY and value != noop:
        raise ConfigError(
            f"'{section}.{key}' is an upstream NeMo AutoModel option this plugin does not implement "
            f"(got {value!r}); remove it or set it to {noop!r}"
        )


def _split(section: str, values: dict) -> dict[type[Options], dict]:
    """A section's keys divided among the classes that declare them; unknown keys refused, upstream no-ops dropped."""
    owners = {name: cls for cls in _SECTIONS[section] for name in cls.yaml_keys()}
    upstream = _UPSTREAM_NOOPS.get(section, {})
    parts: dict[type[Options], dict] = {cls: {} for cls in _SECTIONS[section]}
    for key, value in values.items():
        if key in upstream:
            _check_upstream(section, key, value)
        elif key in owners:
            parts[owners[key]][key] = _nested(owners[key], key, value)
        else:
            raise _unknown(key, [*owners, *upstream], section)
    return parts


def _nested(cls: type[Options], key: str, value: Any) -> Any:
    """A mapping given for a field typed as an option class is built into that class (e.g. eval_decode)."""
    if not (isinstance(value, dict) or hasattr(value, "to_dict")):
        return value
    hint = typing.get_type_hints(cls)[key]
    for candidate in typing.get_args(hint) or (hint,):
        if isinstance(candidate, type) and issubclass(candidate, Options):
            values = _as_dict(value, cls.key(key))
            known = candidate.yaml_keys()
            for name in values:
                if name not in known:
                    raise _unknown(name, known, candidate.SECTION)
            return build(candidate, values)
    return value


def _optimizer(values: dict) -> OptimizerConfig:
    """AdamW keys are checked; with `_target_`, keys other than lr and the schedule go to that class as kwargs."""
    target = values.pop("_target_", None)
    if target is None:
        return build(OptimizerConfig, _split("optimizer", values)[OptimizerConfig])
    own = {k: values.pop(k) for k in ("lr", "warmup_ratio", "min_lr_ratio") if k in values}
    return build(OptimizerConfig, own, target=target, extra=values)


def _checkpoint(values: dict, args_every: Any) -> CheckpointConfig:
    """`recipe_args.ckpt_every_steps` (upstream spelling) is the same key as `checkpoint.ckpt_every_steps`."""
    if args_every is not None:
        rule(
            values.get("ckpt_every_steps") in (None, args_every),
            "'recipe_args.ckpt_every_steps' and 'checkpoint.ckpt_every_steps' disagree",
        )
        values["ckpt_every_steps"] = args_every
    return build(CheckpointConfig, _split("checkpoint", values)[CheckpointConfig])


def _check_top_level(raw: dict) -> None:
    for key in raw:
        if key not in _TOP_LEVEL:
            raise _unknown(key, list(_TOP_LEVEL), "<top level>")
    for key in _UPSTREAM_SECTIONS:
        if raw.get(key):
            raise ConfigError(
                f"'{key}' is an upstream NeMo AutoModel section this plugin does not implement; "
                "remove it (metrics are written to <output_dir>/dspark_train_metrics.jsonl)"
            )
    for section in ("recipe_args", "optimizer"):
        rule(section in raw, f"'{section}' section is required")
    recipe = raw.get("recipe")
    rule(recipe is None or isinstance(recipe, str), f"'recipe' must be a dotted class path, got {recipe!r}")


def parse_config(cfg: Any) -> DSparkRecipeConfig:
    """Validate a whole YAML (dict, AutoModel ConfigNode, or an already parsed config); raises ConfigError."""
    if isinstance(cfg, DSparkRecipeConfig):
        return cfg
    raw = _as_dict(cfg, "<top level>")
    _check_top_level(raw)
    args_values = _as_dict(raw["recipe_args"], "recipe_args")
    args_every = args_values.pop("ckpt_every_steps", None)
    if isinstance(args_values.get("serve_with"), str):  # `serve_with: vllm` means [vllm]
        args_values["serve_with"] = [args_values["serve_with"]]
    parts = _split("recipe_args", args_values)
    loss = build(LossConfig, parts[LossConfig])
    draft = build(DSparkConfig, parts[DSparkConfig], enable_confidence_head=loss.confidence_head_alpha > 0)
    config = DSparkRecipeConfig(
        recipe_args=build(RecipeArgs, parts[RecipeArgs]),
        draft=draft,
        loss=loss,
        optimizer=_optimizer(_as_dict(raw["optimizer"], "optimizer")),
        checkpoint=_checkpoint(_as_dict(raw.get("checkpoint"), "checkpoint"), args_every),
        dist_env=build(DistEnvConfig, _split("dist_env", _as_dict(raw.get("dist_env"), "dist_env"))[DistEnvConfig]),
        distributed=build(
            DistributedConfig,
            _split("distributed", _as_dict(raw.get("distributed"), "distributed"))[DistributedConfig],
        ),
        recipe=raw.get("recipe"),
    )
    check_serving(config, error=ConfigError)  # the option-only engine rules; the target's depth is checked at setup
    return config


def exit_with_error(err: Exception) -> NoReturn:
    """A user error in training: `dspark train: error: …` once (every rank sees the same), every rank exits."""
    sys.exit(report_user_error("train", err))


def config_or_exit(argv: list[str]) -> DSparkRecipeConfig:
    """`-c PATH --section.key=value ...` parsed and checked, or exit with one line naming the key."""
    try:
        return parse_config(load_config(argv))
    except ConfigError as err:
        exit_with_error(err)
