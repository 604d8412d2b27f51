"""Rewrite every row's final assistant turn with the target's own response, in resumable, atomic shards.

Layout: `OUT.shards/shard_{i:05d}.jsonl` (shard i holds the outputs of input rows [i·shard_size, (i+1)·shard_size)),
`OUT.shards/manifest.json` (configuration, completed shards, skipped rows), and finally `OUT`, their concatenation.
Every file is written to a temporary name and renamed, so a killed run leaves only complete shards behind.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from nemo_automodel_dspark.errors import ToolError, require_count, require_device, require_output_file
from nemo_automodel_dspark.io import atomic_path, atomic_write_json, atomic_write_jsonl, remove_leftover_temps
from nemo_automodel_dspark.target.loading import check_model_path, load_target_config
from nemo_automodel_dspark.tools.chat_rows import PromptRow, RowError, output_row, parse_row
from nemo_automodel_dspark.tools.generators import Generation, SamplingConfig

MANIFEST_VERSION = 2  # 2: rows carry prompt_ids/response_ids; the identity fingerprints the target's files
# The fields that decide the output: a resumed run must agree on all of them.
RESUME_FIELDS = (
    "target",
    "data",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "enable_thinking",
    "num_rows",
    "shard_size",
    "batch_size",
    "server",
    "model",
    "chat_template",
)


@dataclass(frozen=True)
class RegenerateConfig:
    """One regeneration run; the fields named in RESUME_FIELDS decide the output, the others only how fast."""

    data: str
    out: str
    target: str | None = None  # required unless `server` is set
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 8
    shard_size: int = 64
    seed: int = 0
    enable_thinking: bool = False
    chat_template: str | None = None  # as recipe_args.chat_template: inline Jinja, a name or a .jinja file
    num_rows: int | None = None
    server: str | None = None
    model: str | None = None
    concurrency: int = 8
    max_retries: int = 4
    retry_backoff_s: float = 1.0
    request_timeout_s: float = 600.0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.server is None and self.target is None:
            raise ToolError("regenerate needs --target (local generation) or --server URL --model NAME")
        if self.server is not None and not self.model:
            raise ToolError("--server needs --model NAME (the model name the server serves)")
        if self.server is not None and self.chat_template is not None:
            raise ToolError("--chat-template applies to local generation (--target); a server renders with its own")
        if self.shard_size < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ToolError("shard_size, batch_size and max_new_tokens must be >= 1")
        for value, flag in ((self.num_rows, "--num-rows"), (self.concurrency, "--concurrency")):
            require_count(value, flag)
        require_count(self.max_retries, "--max-retries", minimum=0)
        if self.target is not None and self.server is None:
            check_model_path(self.target, "--target")
            require_device(self.device, "--device")

    def identity(self) -> dict:
        """The output-deciding fields, paths made absolute: what the manifest stores and resume compares."""
        values = {name: getattr(self, name) for name in RESUME_FIELDS}
        for name in ("target", "data"):  # a hub id (not a local path) is kept as written
            if values[name] is not None and Path(values[name]).exists():
                values[name] = str(Path(values[name]).resolve())
        values["data_bytes"] = Path(self.data).stat().st_size  # an edited input must not be resumed into
        if self.target is not None and Path(self.target).is_dir():  # nor a target retrained at the same path
            values["target_files"] = _target_fingerprint(Path(self.target))
        return values


_TARGET_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "pytorch_model.bin",
)


def _target_fingerprint(directory: Path) -> dict[str, list[int]]:
    """Size and modification time of the files that decide the output (weights, config, tokenizer, template,
    generation config): changes when the target is rebuilt or edited in place."""
    names = [*_TARGET_FILES, *sorted(p.name for p in directory.glob("*.safetensors"))]
    stats = {name: (directory / name).stat() for name in names if (directory / name).is_file()}
    return {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}


def is_up_to_date(config: RegenerateConfig) -> bool:
    """True when `config.out` is the finished output of a run with this configuration (same target files)."""
    path = shards_dir(config.out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        identity = config.identity()
    except (OSError, ValueError):
        return False
    return bool(manifest.get("complete")) and manifest.get("config") == identity and Path(config.out).is_file()


@dataclass
class RegenerateSummary:
    rows_in: int
    rows_out: int
    truncated: int
    skipped: list[dict]  # [{"line": int, "reason": str}] in input order
    out: Path


def shards_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


def regenerate(config: RegenerateConfig) -> RegenerateSummary:
    """Regenerate `config.data` into `config.out`; resumable shard by shard with `config.resume`."""
    if not Path(config.data).is_file():
        raise ToolError(f"--data {config.data} is not a file")
    require_output_file(config.out, "--out")  # its folder also takes OUT.shards/: checked before any row is generated
    if config.server is None and config.target is not None:  # an unreachable hub id: one line, not a traceback
        load_target_config(config.target, "--target")
    manifest = _start_manifest(config)
    directory = shards_dir(config.out)
    out = Path(config.out)  # temps of a killed shard, manifest or output write (this run owns these names now)
    remove_leftover_temps(directory)
    remove_leftover_temps(out.parent, (out.name,))
    generator = None  # loaded only when a shard remains to be generated
    done = len(manifest["shards"])
    total = _count_rows(Path(config.data), config.num_rows)
    bar = tqdm(total=total, initial=min(total, done * config.shard_size), unit="row", disable=not config.progress)
    shards = _batched(_read_rows(Path(config.data), config.num_rows), config.shard_size)
    for index, rows in enumerate(itertools.islice(shards, done, None), start=done):
        if generator is None:
            generator = _make_generator(config)
        records, info = _run_shard(rows, generator, config, seed=config.seed * 1_000_003 + index * config.shard_size)
        atomic_write_jsonl(directory / _shard_name(index), records)
        manifest["shards"].append({"index": index, "file": _shard_name(index), **info})
        atomic_write_json(directory / "manifest.json", manifest)
        bar.update(len(rows))
    bar.close()
    _concatenate(directory, manifest, Path(config.out))
    manifest["complete"] = True
    atomic_write_json(directory / "manifest.json", manifest)
    summary = _summarise(manifest, Path(config.out))
    print_summary(summary)
    return summary


def _make_generator(config: RegenerateConfig):
    from nemo_automodel_dspark.tools.generators import LocalGenerator, ServerGenerator

    sampling = SamplingConfig(config.temperature, config.top_p, config.max_new_tokens, config.enable_thinking)
    if config.server is not None:
        return ServerGenerator(
            config.server,
            config.model or "",
            sampling,
            concurrency=config.concurrency,
            max_retries=config.max_retries,
            backoff_s=config.retry_backoff_s,
            timeout_s=config.request_timeout_s,
        )
    return LocalGenerator(
        config.target or "",
        sampling,
        batch_size=config.batch_size,
        device=config.device,
        chat_template=config.chat_template,
    )


def _start_manifest(config: RegenerateConfig) -> dict:
    """A fresh manifest, or the existing one when resuming with the same configuration."""
    directory = shards_dir(config.out)
    path = directory / "manifest.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if config.resume and old is not None:
        if old.get("version") != MANIFEST_VERSION:
            raise ToolError(
                f"cannot --resume {path}: written by an older dspark (manifest version {old.get('version')}, now "
                f"{MANIFEST_VERSION}; its rows lack prompt_ids/response_ids); rerun with --overwrite"
            )
        _check_same_config(old["config"], config.identity(), path)
        old["shards"] = _existing_prefix(directory, old["shards"])
        old["complete"] = False
        print(f"[dspark] resuming {path}: {len(old['shards'])} shard(s) already complete")
        return old
    if old is not None and not config.overwrite and not config.resume:
        raise ToolError(
            f"{directory} holds a previous run ({len(old['shards'])} shard(s)); pass --resume to continue it "
            "or --overwrite to start over"
        )
    if config.resume:
        print(f"[dspark] nothing to resume in {directory}: starting from the first row")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("shard_*.jsonl*"):
        stale.unlink()
    manifest = {"version": MANIFEST_VERSION, "config": config.identity(), "shards": [], "complete": False}
    atomic_write_json(path, manifest)
    return manifest


def _check_same_config(stored: dict, current: dict, path: Path) -> None:
    differing = [name for name in current if stored.get(name) != current.get(name)]
    if differing:
        details = ", ".join(f"{name}: {stored.get(name)!r} → {current.get(name)!r}" for name in differing)
        raise ToolError(
            f"cannot --resume {path}: the configuration differs in {', '.join(differing)} ({details}); "
            "rerun with the original settings, or without --resume and with --overwrite to start over"
        )


def _existing_prefix(directory: Path, shards: list[dict]) -> list[dict]:
    """The completed shards whose files still exist, up to the first missing one."""
    kept = []
    for i, shard in enumerate(shards):
        if shard["index"] != i or not (directory / shard["file"]).is_file():
            break
        kept.append(shard)
    return kept


def _run_shard(rows: list[tuple[int, bytes]], generator, config: RegenerateConfig, *, seed: int) -> tuple[list, dict]:
    """Generate one shard; returns its output rows and its manifest entry (line range, counts, skipped rows)."""
    prompts: list[PromptRow] = []
    skipped: list[dict] = []
    for line, raw in rows:
        try:
            prompts.append(parse_row(line, raw))
        except RowError as err:
            skipped.append({"line": line, "reason": str(err)})
    generations: list[Generation] = generator([p.prompt for p in prompts], seed=seed) if prompts else []
    records, truncated = [], 0
    for prompt, generation in zip(prompts, generations, strict=True):
        reason = generation.error
        if reason is None and not generation.content and not generation.reasoning:
            reason = "empty generation"  # the target ended at once; whitespace is still what the target says
        if reason is not None:
            skipped.append({"line": prompt.line, "reason": reason})
            continue
        truncated += generation.truncated
        records.append(output_row(prompt, generation.content, generation.reasoning, generation.token_ids))
    skipped.sort(key=lambda s: s["line"])
    info = {"first_line": rows[0][0], "last_line": rows[-1][0], "rows_in": len(rows), "rows_out": len(records)}
    return records, {**info, "truncated": truncated, "skipped": skipped}


def _read_rows(path: Path, limit: int | None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line, at most `limit` of them."""
    with path.open("rb") as f:
        rows = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
        yield from itertools.islice(rows, limit)


def _count_rows(path: Path, limit: int | None) -> int:
    return sum(1 for _ in _read_rows(path, limit))


def _batched(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.jsonl"


def _concatenate(directory: Path, manifest: dict, out: Path) -> None:
    with atomic_path(out) as tmp, tmp.open("wb") as dst:
        for shard in manifest["shards"]:
            dst.write((directory / shard["file"]).read_bytes())


def _summarise(manifest: dict, out: Path) -> RegenerateSummary:
    shards = manifest["shards"]
    return RegenerateSummary(
        rows_in=sum(s["rows_in"] for s in shards),
        rows_out=sum(s["rows_out"] for s in shards),
        truncated=sum(s["truncated"] for s in shards),
        skipped=[entry for s in shards for entry in s["skipped"]],
        out=out,
    )


def print_summary(summary: RegenerateSummary, *, max_listed: int = 20) -> None:
    print(f"[dspark] regenerated {summary.rows_out} of {summary.rows_in} rows → {summary.out}")
    if summary.truncated:
        print(f"[dspark] {summary.truncated} response(s) hit max_new_tokens before end-of-sequence (kept)")
    if not summary.skipped:
        return
    reasons = Counter(entry["reason"].split(":")[0] for entry in summary.skipped)
    print(f"[dspark] skipped {len(summary.skipped)} row(s): " + ", ".join(f"{r} ×{n}" for r, n in reasons.items()))
    for entry in summary.skipped[:max_listed]:
        print(f"  line {entry['line']}: {entry['reason']}")
    if len(summary.skipped) > max_listed:
        print(f"  … {len(summary.skipped) - max_listed} more in the manifest")


def config_from_args(args) -> RegenerateConfig:
    """The CLI namespace → a RegenerateConfig (argparse dests are the field names)."""
    names = {f.name for f in dataclasses.fields(RegenerateConfig)}
    return RegenerateConfig(**{k: v for k, v in vars(args).items() if k in names})
