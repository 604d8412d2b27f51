"""Tokenisation: rows/s of the cache build (one pass, num_proc workers) vs the in-memory loop, and reopen time.

Run from the repository root:

    python benchmarks/tokenize_cache.py                       # 4,000 token-id rows, 1,000 text rows, 100,000-row reopen
    python benchmarks/tokenize_cache.py --num-proc 8 --id-rows 20000

Rows are synthetic chat rows over stdlib text (seeded), tokenised by a byte-level BPE tokenizer trained here
(`tools.tiny_target.train_tokenizer`, Qwen-style template): token-id rows carry `prompt_ids`/`response_ids` as
`dspark regenerate` writes them; text rows are rendered with the chat template. Each kind is tokenised by the loop
(`DSparkChatDataset(cache_dir=None)`: one process, `tokenize_row` per row — the per-row reference the cache must
equal) and by a fresh cache build (token-id rows in bulk by `data.fast_ids`, text rows by `tokenize_row`, in
`num_proc` processes), alternately for `--rounds` rounds (a fresh cache each time); the two datasets are checked
equal (every row, and the report). The ratios use the best round of each (the one the shared machine disturbed
least); the ratio of medians is printed beside them. Then a cache of `--reopen-rows` short token-id rows is built
once and reopened (a restart), timed. The machine's load average is printed at start and end, and beside each
wall-time ratio the ratio of CPU seconds (the build's workers included), which a shared machine disturbs less.
Ends with one JSON line: rows_per_s_ratio_cache_vs_loop_ids, rows_per_s_ratio_cache_vs_loop_text,
cpu_s_ratio_loop_vs_cache_ids, cpu_s_ratio_loop_vs_cache_text, reopen_s.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LENGTH = 4096


def _texts(max_chars: int, seed: int, longest: int = 400) -> list[list[str]]:
    """Word runs of 1/8 to 1 times `longest` words from stdlib text."""
    from nemo_automodel_dspark.tools.tiny_target import tokenizer_corpus

    words = " ".join(tokenizer_corpus(max_chars)).split()
    rng = random.Random(seed)
    return [words[i : i + rng.randint(longest // 8, longest)] for i in range(0, len(words) - longest, 97)]


def _conversation(rng: random.Random, texts: list[list[str]]) -> list[dict]:
    prompt, answer = rng.choice(texts), rng.choice(texts)
    return [{"role": "user", "content": " ".join(prompt)}, {"role": "assistant", "content": " ".join(answer)}]


def _write_rows(path: Path, n: int, tokenizer, texts: list[list[str]], *, token_ids: bool, seed: int) -> None:
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    with open(path, "w") as f:
        for _ in range(n):
            messages = _conversation(rng, texts)
            row: dict = {"messages": messages}
            if token_ids:
                prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
                response = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"] + [eos]
                messages[1]["content"] = tokenizer.decode(response, skip_special_tokens=True)
                row.update(prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"], response_ids=response)
            f.write(json.dumps(row) + "\n")


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the build's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(make, cpu: list[float] | None = None):
    start, start_cpu = time.perf_counter(), _cpu_s()
    value = make()
    if cpu is not None:
        cpu.append(_cpu_s() - start_cpu)
    return value, time.perf_counter() - start


def _compare(kind: str, path: Path, rows: int, tokenizer, args, cache_root: str) -> tuple[float, float]:
    """Loop vs fresh cache build on the same file, alternately for `args.rounds` rounds; returns the ratios
    loop / cache of the best wall time of each (the round the shared machine disturbed least) and of the CPU time of
    those rounds."""
    from nemo_automodel_dspark.data.dataset import DSparkChatDataset

    def loop():
        return DSparkChatDataset(str(path), tokenizer, SEQ_LENGTH, show_progress=False)

    def build(root: str):
        return DSparkChatDataset(
            str(path), tokenizer, SEQ_LENGTH, cache_dir=root, num_proc=args.num_proc, show_progress=False
        )

    loop_s, cache_s, loop_cpu, cache_cpu = [], [], [], []
    for r in range(args.rounds):
        looped, seconds = _timed(loop, loop_cpu)
        loop_s.append(seconds)
        cached, seconds = _timed(lambda: build(f"{cache_root}_{r}"), cache_cpu)  # noqa: B023 (called at once)
        cache_s.append(seconds)
        assert len(looped) == len(cached) == rows and looped.report() == cached.report()
        assert looped.lengths() == cached.lengths()
        for i in range(len(looped)):
            assert looped[i]["input_ids"].equal(cached[i]["input_ids"])
            assert looped[i]["loss_mask"].equal(cached[i]["loss_mask"])
        print(f"{kind:>5} rows, round {r + 1}: loop {loop_s[-1]:.3f} s, cache build {cache_s[-1]:.3f} s")
    best_loop = min(range(args.rounds), key=loop_s.__getitem__)
    best_cache = min(range(args.rounds), key=cache_s.__getitem__)
    ratio, cpu_ratio = loop_s[best_loop] / cache_s[best_cache], loop_cpu[best_loop] / cache_cpu[best_cache]
    print(f"{kind:>5} rows: loop {rows / loop_s[best_loop]:9.1f} rows/s   ", end="")
    print(f"cache build {rows / cache_s[best_cache]:9.1f} rows/s   ratio {ratio:.2f}   ", end="")
    print(f"(best of {args.rounds}; ratio of medians {np.median(loop_s) / np.median(cache_s):.2f}; ", end="")
    print(f"num_proc={args.num_proc}, {sum(looped.lengths()) / rows:.0f} tokens/row)")
    print(f"{'':>11}CPU s: loop {loop_cpu[best_loop]:.2f}, cache build {cache_cpu[best_cache]:.2f} ", end="")
    print(f"(workers in)   ratio {cpu_ratio:.2f}")
    return ratio, cpu_ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--id-rows", type=int, default=4_000)
    parser.add_argument("--text-rows", type=int, default=1_000)
    parser.add_argument("--reopen-rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--rounds", type=int, default=3, help="loop and cache build alternately, best of each")
    args = parser.parse_args()

    from nemo_automodel_dspark.data.dataset import DSparkChatDataset
    from nemo_automodel_dspark.tools.tiny_target import train_tokenizer

    tokenizer = train_tokenizer(4096, 400_000)
    texts = _texts(400_000, seed=0)
    figures: dict[str, float] = {}
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind, rows, ids in (("ids", args.id_rows, True), ("text", args.text_rows, False)):
            path = root / f"{kind}.jsonl"
            _write_rows(path, rows, tokenizer, texts, token_ids=ids, seed=1)
            ratio, cpu_ratio = _compare(kind, path, rows, tokenizer, args, str(root / f"cache_{kind}"))
            figures[f"rows_per_s_ratio_cache_vs_loop_{kind}"] = round(ratio, 2)
            figures[f"cpu_s_ratio_loop_vs_cache_{kind}"] = round(cpu_ratio, 2)
        path = root / "reopen.jsonl"
        _write_rows(path, args.reopen_rows, tokenizer, _texts(400_000, 0, longest=40), token_ids=True, seed=2)
        cache = str(root / "cache_reopen")
        built, build_s = _timed(
            lambda: DSparkChatDataset(
                str(path), tokenizer, SEQ_LENGTH, cache_dir=cache, num_proc=args.num_proc, show_progress=False
            )
        )
        reopened, reopen_s = _timed(lambda: DSparkChatDataset(str(path), tokenizer, SEQ_LENGTH, cache_dir=cache))
        assert len(built) == len(reopened) == args.reopen_rows
        print(f"{args.reopen_rows} rows: cache build {build_s:.1f} s, reopen {reopen_s:.3f} s (target < 1 s)")
        figures["reopen_s"] = round(reopen_s, 3)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
