"""The tokenised cache: same rows, counts and messages as the in-memory loop; fingerprinted; built once; reused."""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from nemo_automodel_dspark.data import cache, cache_build
from nemo_automodel_dspark.data.chat import RowOptions
from nemo_automodel_dspark.data.dataset import DSparkChatDataset

SEQ = 64


def _ids_row(tokenizer, conversation, response_ids: list[int]) -> dict:
    messages = conversation("hello", "")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    messages[-1]["content"] = tokenizer.decode(response_ids, skip_special_tokens=True)
    return {
        "messages": messages,
        "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
        "response_ids": response_ids,
    }


@pytest.fixture
def mixed_rows(tokenizer, conversation):
    """Good text and token-id rows among every kind of bad row, a truncated row and an empty answer."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, pad, mask_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|mask|>"))
    ok = _ids_row(tokenizer, conversation, ids("hello world.") + [eos])
    good = {"messages": conversation("hello", "paris.")}
    return [
        good,
        "{not json",
        ok,
        {"messages": [{"role": "user", "content": "hello"}]},
        _ids_row(tokenizer, conversation, ids("hello world.") + [eos, pad, pad]),
        {"text": "hello"},
        {"messages": conversation(" ".join(["numbers"] * 100), "five.")},  # nothing supervised after truncation
        _ids_row(tokenizer, conversation, ids("hello") + [mask_id] + ids(" world.") + [eos]),
        {**ok, "response_ids": [len(tokenizer) + 5]},
        {**ok, "response_ids": [1.5, 2]},
        {"messages": conversation("hello", " ".join(["the answer is two plus four"] * 12))},  # truncated
        {"messages": conversation("hello", "")},  # empty answer
        "{also not json",
        {k: v for k, v in ok.items() if k != "prompt_ids"},
        good,
    ]


def _same(a: DSparkChatDataset, b: DSparkChatDataset) -> None:
    assert len(a) == len(b) and a.lengths() == b.lengths()
    for x, y in zip(a, b, strict=True):
        assert x["input_ids"].dtype == y["input_ids"].dtype == torch.long
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
    assert list(a.skipped.items()) == list(b.skipped.items())  # same counts, in the same order
    assert a.first_skipped == b.first_skipped
    assert a.report() == b.report()


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_cache_equals_the_loop(tmp_path, tokenizer, mixed_rows, write_jsonl, num_proc, monkeypatch):
    if num_proc > 1:  # chunks of a line or two: the workers and the parent each tokenise some
        monkeypatch.setattr(cache_build, "CHUNK_BYTES", 150)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)  # 3 on 2 CPUs too
    path = str(write_jsonl(tmp_path / "train.jsonl", mixed_rows))
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    loop = DSparkChatDataset(path, tokenizer, SEQ, mask_token_id=mask_id)
    cached = DSparkChatDataset(
        path, tokenizer, SEQ, mask_token_id=mask_id, cache_dir=str(tmp_path / "c"), num_proc=num_proc
    )
    _same(cached, loop)
    assert loop.num_token_ids == 1 and loop.num_empty_answers == 1 and loop.num_truncated == 1
    assert sum(loop.skipped.values()) == 10 and len(loop.skipped) == 8
    (folder,) = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "rows.arrow"]  # the workers' files removed


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_jsonl_chunks_are_whole_lines_covering_the_file(tmp_path, chunk_bytes):
    data = b"".join(b"x" * n + b"\n" for n in (0, 3, 100, 0, 0, 9, 1, 64, 2)) + b"no newline"
    (tmp_path / "a.jsonl").write_bytes(data)
    ranges = list(cache_build.jsonl_ranges(str(tmp_path / "a.jsonl"), chunk_bytes))
    assert [r[1] for r in ranges] == [0] + [o + n for _, o, n in ranges[:-1]] and sum(r[2] for r in ranges) == len(data)
    pieces = [data[o : o + n] for _, o, n in ranges]
    assert all(piece.endswith(b"\n") and len(piece) >= chunk_bytes for piece in pieces[:-1])
    # the fewest whole lines reaching chunk_bytes: without its last line a chunk is shorter than that
    assert all(len(piece) - len(piece[:-1].rsplit(b"\n", 1)[-1]) - 1 < chunk_bytes for piece in pieces[:-1])
    numbered = [cache_build._lines(piece) for piece in pieces]
    firsts = np.cumsum([0] + [n for _, n in numbered])[:-1]
    lines = [(first + i, line) for (rows, _), first in zip(numbered, firsts, strict=True) for i, line in rows]
    assert lines == [(i, line) for i, line in enumerate(data.split(b"\n"), 1) if line.strip()]


def test_chunk_size_gives_every_process_many_chunks_within_bounds(monkeypatch):
    mib = 1 << 20
    assert cache_build.chunk_bytes(10_000 * mib, 8) == mib  # a large file: the largest chunks
    assert cache_build.chunk_bytes(6 * mib, 2) == 6 * mib // 32  # 16 chunks per process
    assert cache_build.chunk_bytes(6 * mib, 1) == 6 * mib // 16
    assert cache_build.chunk_bytes(100_000, 2) == 1 << 16  # never below 64 KiB
    monkeypatch.setattr(cache_build, "CHUNK_BYTES", 150)  # as the tests set it: tiny chunks
    assert cache_build.chunk_bytes(10_000 * mib, 8) == cache_build.chunk_bytes(10, 1) == 150


def test_cache_equals_the_loop_for_a_json_list(tmp_path, tokenizer, mixed_rows):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([r for r in mixed_rows if isinstance(r, dict)]))
    loop = DSparkChatDataset(str(path), tokenizer, SEQ)
    _same(DSparkChatDataset(str(path), tokenizer, SEQ, cache_dir=str(tmp_path / "c")), loop)
    assert "first at row" in loop.report()


def test_restarts_reuse_the_cache_and_inputs_change_its_name(
    tmp_path, tokenizer, conversation, write_jsonl, monkeypatch
):
    path = str(write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation("hello", "paris.")}]))
    root = tmp_path / "c"
    first = DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(root))
    monkeypatch.setattr(cache, "_build", lambda *a: pytest.fail("a reopen must not rebuild"))
    again = DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(root))
    assert torch.equal(first[0]["input_ids"], again[0]["input_ids"])

    template = first_template = tokenizer.chat_template
    options = RowOptions(template=template, seq_length=SEQ)
    name = cache.cache_fingerprint(path, "train", tokenizer, options)
    assert [p.name for p in root.iterdir() if p.is_dir()] == [name]
    changed = [
        cache.cache_fingerprint(path, "train", tokenizer, RowOptions(template=template, seq_length=SEQ + 1)),
        cache.cache_fingerprint(path, "train", tokenizer, RowOptions(template=template + " ", seq_length=SEQ)),
        cache.cache_fingerprint(path, "train", tokenizer, RowOptions(first_template, SEQ, True)),
        cache.cache_fingerprint(path, "train", tokenizer, RowOptions(first_template, SEQ, False, 5)),
        cache.cache_fingerprint(path, "test", tokenizer, options),
    ]
    tokenizer = copy.deepcopy(tokenizer)  # the session fixture stays as it is for the other tests
    tokenizer.add_tokens(["<|new|>"])
    changed.append(cache.cache_fingerprint(path, "train", tokenizer, options))
    with open(path, "a") as f:
        f.write(json.dumps({"messages": conversation("hello", "five.")}) + "\n")
    os.utime(path, ns=(1, 1))
    changed.append(cache.cache_fingerprint(path, "train", tokenizer, options))
    assert len({name, *changed}) == len(changed) + 1


def test_mask_token_in_supervised_text_is_the_same_error(tmp_path, tokenizer, conversation, write_jsonl):
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    rows = [{"messages": conversation("hello", "paris.")}, {"messages": conversation("hello", "it is <|mask|>.")}]
    path = str(write_jsonl(tmp_path / "train.jsonl", rows))
    messages = []
    for cache_dir in (None, str(tmp_path / "c")):
        with pytest.raises(ValueError, match="occurs in the supervised") as err:
            DSparkChatDataset(path, tokenizer, SEQ, mask_token_id=mask_id, cache_dir=cache_dir)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "line 2" in messages[0]


def test_one_process_builds_while_the_others_wait(tmp_path, tokenizer, conversation, write_jsonl, monkeypatch):
    path = str(write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation("hello", "paris.")}] * 3))
    builds, real_build = [], cache._build
    monkeypatch.setattr(cache, "_build", lambda *a: (builds.append(1), real_build(*a)))
    results: list[DSparkChatDataset] = []

    def open_it() -> None:
        results.append(DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c")))

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 3 and all(len(r) == 3 for r in results)


def _damage_table(folder):
    table, cut = folder / "rows.arrow", folder / "cut"
    cut.write_bytes(table.read_bytes()[: table.stat().st_size // 2])  # a build cut short: half the table
    cut.replace(table)  # a new file: truncating the mapped one in place would crash this process (SIGBUS)


def _damage_meta(folder):
    (folder / "meta.json").write_text('{"report": ')


def _other_rows(folder):  # a table of another size: meta.json counts one row more
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "rows": meta["rows"] + 1}))


@pytest.mark.parametrize("damage", [_damage_table, _damage_meta, _other_rows, lambda f: (f / "rows.arrow").unlink()])
def test_a_damaged_cache_is_built_again_with_a_warning(tmp_path, tokenizer, mixed_rows, write_jsonl, damage):
    path = str(write_jsonl(tmp_path / "train.jsonl", mixed_rows * 20))
    assert len(DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c"))) == 120
    (folder,) = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    damage(folder)
    with pytest.warns(UserWarning, match=f"tokenised cache {folder} is damaged"):
        again = DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c"))
    _same(again, DSparkChatDataset(path, tokenizer, SEQ))


def test_processes_are_capped_at_the_cpus(tmp_path, tokenizer, mixed_rows, write_jsonl, monkeypatch):
    path = str(write_jsonl(tmp_path / "train.jsonl", mixed_rows))
    monkeypatch.setattr(cache_build, "CHUNK_BYTES", 150)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(cache_build.multiprocessing, "get_context", lambda *a: pytest.fail("one CPU: no workers"))
    cached = DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c"), num_proc=4)
    _same(cached, DSparkChatDataset(path, tokenizer, SEQ))


def test_a_long_build_shows_progress(tmp_path, tokenizer, mixed_rows, write_jsonl, monkeypatch, capsys):
    path = str(write_jsonl(tmp_path / "train.jsonl", mixed_rows))
    monkeypatch.setattr(cache_build, "PROGRESS_MIN_BYTES", 0)
    DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "quiet"), show_progress=False)
    assert "into the cache" not in capsys.readouterr().err
    DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c"), show_progress=True, num_proc=2)
    err = capsys.readouterr().err
    assert f"tokenising {path} into the cache (2 processes)" in err and "100%" in err


def test_a_worker_killed_mid_build_is_an_error_not_a_hang(tmp_path, tokenizer, mixed_rows, write_jsonl, monkeypatch):
    path = str(write_jsonl(tmp_path / "train.jsonl", mixed_rows * 4))
    monkeypatch.setattr(cache_build, "CHUNK_BYTES", 150)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    parent, real = os.getpid(), cache_build.tokenize_id_lines

    def killed_in_a_worker(*args):  # the forked worker inherits this; the parent tokenises normally
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    monkeypatch.setattr(cache_build, "tokenize_id_lines", killed_in_a_worker)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker building the tokenised cache \(pid \d+\) died with exit code -9"):
        DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c"), num_proc=2)
    assert time.monotonic() - start < 30
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == []  # nothing half-built kept
