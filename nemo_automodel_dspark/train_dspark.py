"""`TrainDSparkRecipe`: train a DSpark drafter against a frozen target, runnable by AutoModel's recipe loader
(`recipe: nemo_automodel_dspark.train_dspark.TrainDSparkRecipe`) or directly:

    torchrun --standalone --nproc_per_node=2 -m nemo_automodel_dspark.train_dspark -c cfg.yaml --recipe_args.max_steps=5
"""

from __future__ import annotations

import sys

from nemo_automodel_dspark.recipe.config import (
    ConfigError,
    DSparkRecipeConfig,
    config_or_exit,
    exit_with_error,
    parse_config,
)

if __name__ == "__main__":  # `python -m ...train_dspark`: check every option before torch and NeMo AutoModel load
    config_or_exit(sys.argv[1:])

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
from nemo_automodel.recipes.base_recipe import BaseRecipe
from tqdm import tqdm

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.data import DSparkChatDataset
from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.loss import flatten_sums, metrics_from_sums, unflatten_sums
from nemo_automodel_dspark.model.families import family_for
from nemo_automodel_dspark.recipe import batching, resume, run_folder, target_setup
from nemo_automodel_dspark.recipe import checkpoint as ckpt
from nemo_automodel_dspark.recipe.eval_decode import decode_metrics
from nemo_automodel_dspark.recipe.guards import RunStopped, divergence_message, non_finite_tensors
from nemo_automodel_dspark.recipe.inputs import check_data, load_decode_prompts, open_dataset
from nemo_automodel_dspark.recipe.metrics import console_line
from nemo_automodel_dspark.recipe.optim import build_optimizer, build_scheduler
from nemo_automodel_dspark.recipe.serving_checks import check_serving, warning_text
from nemo_automodel_dspark.recipe.sharded_draft import build_draft
from nemo_automodel_dspark.recipe.state import MetricsWindow, Progress, ProgressField, due_after_step
from nemo_automodel_dspark.recipe.step import DSparkStep, MicroBatch
from nemo_automodel_dspark.target.loading import load_tokenizer


@dataclass
class FrozenTarget:
    """Holder that keeps the frozen target out of BaseRecipe's checkpointed state."""

    model: torch.nn.Module


class TrainDSparkRecipe(BaseRecipe):
    """Frozen target + trainable DSpark draft; setup() reads as a table of contents of `_build_*` steps and
    `run_train_validation_loop` as the loop: train a step, then do what `due_after_step` says is due."""

    step, epoch, skipped_steps = ProgressField(), ProgressField(), ProgressField()

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.config: DSparkRecipeConfig = parse_config(cfg)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        args = self.config.recipe_args
        self.target_config, self.draft_config = target_setup.check_target(self.config)
        self.info = D.init_distributed(self.config.dist_env.backend, self.config.dist_env.timeout_minutes)
        torch.manual_seed(args.shuffle_seed)
        self._check_serving(self.target_config)
        check_data(args)
        self.files = run_folder.RunFiles(args.output_dir, self.config.checkpoint, self.info.is_main, self._log)
        self.files.claim(args.overwrite_output_dir)
        D.barrier()
        self._build_data()
        self._build_target()
        self._build_draft()
        self._build_optimizer()
        self._build_metrics()
        self._restore()

    def _log(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message)

    def _check_serving(self, target_config) -> None:
        """Engine rules that need the target's depth and family (config.json only), before data or weights load."""
        message = warning_text(check_serving(self.config, target_config, error=ToolError))  # one line, no traceback
        if message:
            self._log(message)

    def _build_data(self) -> None:
        args = self.config.recipe_args
        self.tokenizer = load_tokenizer(args.target_model_name_or_path, args.trust_remote_code)
        self.train_set = self._dataset(args.train_data_path, args.train_split)
        self.val_set = self._dataset(args.val_data_path, args.val_split) if args.val_data_path else None
        self.sampler = batching.train_sampler(self.train_set, args, self.info)
        self.per_step = batching.items_per_step(args)
        if self._steps_in_epoch(0) == 0:
            unit = (
                "micro-batches (ranks x grad_accumulation_steps)"
                if batching.plan_options(args)
                else ("rows (ranks x micro_batch_size x grad_accumulation_steps)")
            )
            raise ConfigError(
                f"{args.train_data_path}: {len(self.train_set)} usable rows cannot fill one optimizer "
                f"step of {self.per_step * self.info.world_size} {unit}"
            )
        total = sum(self._steps_in_epoch(epoch) for epoch in range(args.num_epochs))
        self.total_steps = min(total, args.max_steps) if args.max_steps else total
        self._decode_prompts = load_decode_prompts(args, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _steps_in_epoch(self, epoch: int) -> int:
        return batching.steps_in_epoch(self.sampler, epoch, self.per_step)

    def _dataset(self, path: str, split: str) -> DSparkChatDataset:
        dataset = open_dataset(self.config.recipe_args, self.tokenizer, path, split, self.draft_config, self.info)
        self._log(dataset.report())
        return dataset

    def _build_target(self) -> None:
        """The frozen target, replicated or FSDP2-sharded as the memory plan decides (printed once at start-up)."""
        args = self.config.recipe_args
        self.plan = target_setup.memory_plan(self.config, self.target_config, self.info)
        self._log(self.plan.table())
        self._log(target_setup.sharding_line(self.plan, args.shard_dense_target, self.info.world_size))
        self.frozen = FrozenTarget(target_setup.load_frozen_target(args, self.info, self.plan, self._log))

    def _build_draft(self) -> None:
        args = self.config.recipe_args
        if self.draft_config.attention_backend == "flex_attention" and self.info.device.type != "cuda":
            self._log("attention_backend: flex_attention needs CUDA; using SDPA with a dense block mask on CPU")
        parts = family_for(self.frozen.model.config).decoder_parts(self.frozen.model)
        embed = D.full_tensor(cast(torch.Tensor, parts.embed_tokens.weight))  # gathered when the target is sharded
        lm_head = D.full_tensor(cast(torch.Tensor, parts.lm_head.weight))
        dist = self.config.distributed
        self.draft, self.model = build_draft(
            self.frozen.model.config,
            self.draft_config,
            embed,
            lm_head,
            info=self.info,
            strategy=dist.strategy,
            activation_checkpointing=dist.activation_checkpointing,
            seed=args.shuffle_seed,
            warm_start=args.draft_weights_path,
        )
        del embed, lm_head
        if args.draft_weights_path:
            self._log(f"draft_weights_path: started from {args.draft_weights_path}")
        self.runner = DSparkStep(
            self.model,
            self.draft,
            self.frozen.model,
            args,
            self.config.loss,
            self.info,
            defer_fsdp_sync=dist.defer_fsdp_grad_sync,
        )

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config.optimizer)
        self.lr_scheduler = build_scheduler(self.optimizer, self.config.optimizer, self.total_steps)

    def _build_metrics(self) -> None:
        self.files.open()
        self.progress = Progress()
        self._rows: Iterator | None = (
            None  # this epoch's sampler iterator (rows or micro-batch plans; resumes mid-epoch)
        )
        self.window = MetricsWindow()

    def _restore(self) -> None:
        """Resume from `checkpoint.restore_from` (path or LATEST): weights, optimizer, schedule, data position."""
        path = ckpt.resolve_restore(self.config.checkpoint.restore_from, self.files.ckpt_root, warn=self._log)
        if path is None:
            if self.config.checkpoint.restore_from:
                self._log(f"restore_from: no checkpoint under {self.files.ckpt_root} yet; starting from scratch")
            self.files.truncate_metrics(0)
            return
        state = ckpt.load_trainer_state(path)
        resume.check_compatible(path, state["compat"], resume.compat_record(self.config, self.draft_config))
        model_state, optim_state = ckpt.load_weights(path)  # every rank reads: checkpoint_dir is shared storage
        try:
            D.load_full_state(self.model, self.optimizer, model_state, optim_state)
        except (RuntimeError, KeyError, ValueError) as err:  # a checkpoint from before shape fields were recorded
            raise resume.IncompatibleCheckpoint(
                f"checkpoint {path} does not fit the configured draft ({str(err).splitlines()[0]}); resume with the "
                "draft options it was trained with"
            ) from err
        self.lr_scheduler.load_state_dict(state["scheduler"])
        resume.apply_optimizer_changes(
            state.get("optimizer"), self.config.optimizer, self.optimizer, self.lr_scheduler, self._log
        )
        batching.restore_position(self.sampler, state["sampler"], path)
        self.progress.load_state_dict(state)
        self.window.load_state_dict(state.get("window"), self.info)
        self.runner.guard.load_state_dict(state.get("divergence"))
        self.files.truncate_metrics(self.step)
        self.files.set_aside_newer(self.step)
        resume.announce_changes(state.get("options"), resume.training_record(self.config), self.step + 1, self._log)
        self._log(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    # ------------------------------------------------------------------ loop
    def _micro_batches(self, dataset: DSparkChatDataset, items: list) -> list[MicroBatch]:
        """Collate sampler items (rows, or whole micro-batch plans) into CPU micro-batches (moved inside the step)."""
        args = self.config.recipe_args
        if batching.plan_options(args):
            return [batching.plan_micro_batch(dataset, plan, args, self.pad_id) for plan in items]
        return batching.padded_micro_batches(
            dataset, items, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length, pad_token_id=self.pad_id
        )

    def run_train_validation_loop(self) -> None:
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.info.is_main, desc="dspark")
        self.model.train()
        self.window.start = time.perf_counter()  # tokens/s counts training time, not setup
        try:
            while self.step < self.total_steps:
                self._train_step()
                bar.update(1)
                self._after_step()
        finally:
            bar.close()  # a stopped run's last line starts on a fresh line
        D.barrier()

    def _train_step(self) -> None:
        if self._rows is None:
            self.sampler.set_epoch(self.epoch)
            self._rows = iter(self.sampler)
        batches = self._micro_batches(self.train_set, [next(self._rows) for _ in range(self.per_step)])
        self.window.tokens += sum(int(mb.attention_mask.sum()) for mb in batches)  # CPU tensors: no device sync
        sums, grad_norm = self.runner.train_step(batches, self.epoch, self.optimizer, self.lr_scheduler)
        if self.runner.last_verdict is None:
            self.window.add(sums, grad_norm)
        else:
            self._skip_refused(self.runner.last_verdict)
        self.step += 1

    def _after_step(self) -> None:
        """Log, validate, close the epoch, decode and checkpoint as the cadences say (`due_after_step`)."""
        step_epoch = self.epoch
        due = due_after_step(
            self.config,
            self.step,
            epoch_done=self.sampler.consumed // self.per_step >= self._steps_in_epoch(self.epoch),
            last=self.step >= self.total_steps,
            has_val=self.val_set is not None,
        )
        if due.log:
            self._log_window(step_epoch)
        if due.validate:
            self._validate(step_epoch)
        if due.end_epoch:
            self._next_epoch()
        if due.decode:
            self._eval_decode(step_epoch)
        if due.checkpoint:
            self._save(step_epoch)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.sampler.set_epoch(self.epoch)
        self._rows = None

    def _skip_refused(self, reason: str) -> None:
        """Count a step the guard refused; stop (every rank, same decision) once the allowance is used up."""
        self.skipped_steps += 1
        allowed, step = self.config.recipe_args.max_skipped_steps, self.step + 1
        if self.skipped_steps > allowed:
            last_good = self.files.last_good(before=step - 1)  # step's loss came from the weights of step - 1
            raise RunStopped(divergence_message(step, reason, self.skipped_steps, allowed, last_good))
        self._log(f"step {step}: {reason}; step skipped ({self.skipped_steps}/{allowed})")

    def _log_window(self, epoch: int) -> None:
        if self.window.sums is None:
            return
        window = self.window.reduce(self.info)
        elapsed = time.perf_counter() - self.window.start
        record = {
            "step": self.step,
            "epoch": epoch,
            **metrics_from_sums(window.sums, self.config.loss),
            "lr": self.runner.last_lr,
            "grad_norm": window.grad_norm,
            "tokens_per_s": window.tokens / max(elapsed, 1e-9),
            "mem": window.peak_memory_gib,
            **({"skipped_steps": self.skipped_steps} if self.skipped_steps else {}),
        }
        self._write_metrics(record)
        self._log(console_line(record))
        self.window.reset()

    def _validate(self, epoch: int) -> None:
        """Objective and diagnostics on the validation split (own anchor stream: training is unaffected)."""
        args, val_set = self.config.recipe_args, self.val_set
        assert val_set is not None
        batches = batching.validation_micro_batches(val_set, args, self.info, self.pad_id)  # training's batching
        sums = self.runner.eval_sums(batches)
        flat = D.all_reduce_sum(flatten_sums(sums).to(self.info.device))
        metrics = metrics_from_sums(unflatten_sums(flat.cpu(), sums), self.config.loss)
        record = {"step": self.step, "epoch": epoch, **{f"val/{k}": v for k, v in metrics.items()}}
        self._write_metrics(record)
        self._log(console_line(record))

    def _eval_decode(self, epoch: int) -> None:
        """Real speculative decoding on rank 0 with a consolidated copy of the draft; training state is untouched."""
        state = D.full_model_state(self.model)  # every rank joins the gather
        record = None
        if self.info.is_main:
            args, model = self.config.recipe_args, self.frozen.model
            metrics = decode_metrics(
                model, self.draft, state, self.tokenizer, self._decode_prompts, args, self.info.device
            )
            record = {"step": self.step, "epoch": epoch, **metrics}
            self._log(console_line(record))
        self._write_metrics(record)  # every rank joins: it is also the barrier

    def _write_metrics(self, record: dict | None) -> None:
        """Rank 0 appends `record`; every rank calls this, so a full disk stops every rank with the same line."""
        failure = self.files.write_metrics(record) if self.info.is_main and record is not None else None
        self._stop_if(failure)

    def _stop_if(self, failure: str | None) -> None:
        """Share rank 0's verdict with every rank (a sync point) and stop all of them when there is one."""
        failure = D.broadcast_object(failure)
        if failure:
            raise RunStopped(failure)

    def _save(self, epoch: int) -> None:
        """Consolidate on rank 0 and write `epoch_{E}_step_{S}/` atomically; every rank joins the gathers."""
        model_state, optim_state = D.full_state(self.model, self.optimizer)
        bad = non_finite_tensors(model_state) if self.info.is_main else []  # rank 0 holds the consolidated state
        if float(D.all_reduce_sum(torch.tensor([float(len(bad))], device=self.info.device))) > 0:
            raise RunStopped(
                f"step {self.step}: the draft has non-finite weights ({', '.join(bad[:3]) or 'on rank 0'}); "
                f"no checkpoint was written; the last good checkpoint is {self.files.last_good() or 'none'}"
            )
        state = self._trainer_state()  # every rank joins the window's reduction
        failure = None
        if self.info.is_main:
            failure = self._write_checkpoint(epoch, model_state, optim_state, state)
        self._stop_if(failure)

    def _trainer_state(self) -> dict:
        """Everything a resumed run needs besides weights and optimizer state, in one place (read by `_restore`)."""
        return {
            **self.progress.state_dict(),
            "sampler": self.sampler.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "compat": resume.compat_record(self.config, self.draft_config),
            "optimizer": resume.optimizer_record(self.config.optimizer),
            "options": resume.training_record(self.config),
            "window": self.window.state_dict(self.info),
            "divergence": self.runner.guard.state_dict(),
        }

    def _write_checkpoint(self, epoch: int, model_state: dict, optim_state: dict, state: dict) -> str | None:
        """Rank 0: write the checkpoint; a full disk is returned as the one line to stop with (nothing half-written)."""
        return self.files.write_checkpoint(
            epoch,
            self.step,
            draft=self.draft,
            model_state=model_state,
            optimizer_state=optim_state,
            trainer_state=state,
        )


def main(argv: list[str] | None = None) -> None:
    """`python -m nemo_automodel_dspark.train_dspark -c cfg.yaml [--section.key=value ...]` (under torchrun).

    A user error (a bad option, one the target's config.json refutes) or a stop (divergence, a full disk) prints
    one line on rank 0 and exits with the same status on every rank, without a traceback.
    """
    config = config_or_exit(sys.argv[1:] if argv is None else argv)
    recipe = TrainDSparkRecipe(config)
    try:
        recipe.setup()
        recipe.run_train_validation_loop()
    except (ConfigError, ToolError) as err:
        exit_with_error(err)
    finally:
        D.destroy()


if __name__ == "__main__":
    main()
