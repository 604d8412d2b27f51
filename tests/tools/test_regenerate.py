"""`regenerate`: final assistant turns become the target's own greedy output; shards resume exactly; a flaky
server is retried and a dead row is skipped, never fatal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel_dspark.cli import main
from nemo_automodel_dspark.data.chat import split_reasoning
from nemo_automodel_dspark.data.sources import RowError
from nemo_automodel_dspark.tools.chat_rows import parse_row
from nemo_automodel_dspark.tools.regenerate import RegenerateConfig, is_up_to_date, regenerate, shards_dir
from nemo_automodel_dspark.tools.stdlib_corpus import stdlib_chat_rows


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _greedy_reference(target: Path, prompt: list[dict], max_new_tokens: int) -> tuple[str, list[int], list[int]]:
    """One unpadded greedy `generate` for one prompt, cut at the first EOS: what the target says, as text and as
    (prompt ids, response ids up to and including the EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, ids.shape[1] :].tolist()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    response = new[: new.index(eos) + 1] if eos in new else new
    return tokenizer.decode(response, skip_special_tokens=True), ids[0].tolist(), response


def test_greedy_rows_equal_the_targets_own_generation(tiny_target, tmp_path, capsys):
    rows = stdlib_chat_rows("held_out", 4, seed=0)
    multi_turn = {
        "id": "mt",
        "messages": [
            {"role": "system", "content": "You write Python."},
            *rows[3]["messages"],
            {"role": "user", "content": [{"type": "text", "text": "Continue this Python code from x.py:\n"}]},
            {"role": "assistant", "content": "the dataset's answer, to be replaced"},
        ],
    }
    lines = [
        json.dumps(rows[0]),
        "{bad json",
        json.dumps(rows[1]),
        "",  # blank lines are not rows
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),  # a prompt-only row is answered
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}),
        json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": rows[2]["messages"][0]["content"]},
                    {"from": "gpt", "value": "old"},
                ]
            }
        ),
        json.dumps(multi_turn),
    ]
    data = _write_jsonl(tmp_path / "in.jsonl", lines)
    config = RegenerateConfig(
        data=str(data),
        out=str(tmp_path / "out.jsonl"),
        target=str(tiny_target),
        max_new_tokens=12,
        batch_size=3,
        shard_size=4,
        progress=False,
    )
    summary = regenerate(config)

    assert [(s["line"], s["reason"]) for s in summary.skipped] == [
        (2, "invalid JSON"),
        (6, "no user turn before the final assistant turn"),
    ]
    assert "line 2: invalid JSON" in capsys.readouterr().out
    out = _read_jsonl(tmp_path / "out.jsonl")
    prompts = [
        rows[0]["messages"][:1],
        rows[1]["messages"][:1],
        [{"role": "user", "content": "no answer"}],
        rows[2]["messages"][:1],
        multi_turn["messages"][:-1],
    ]
    prompts[4][-1] = {"role": "user", "content": "Continue this Python code from x.py:\n"}  # text parts → a string
    assert summary.rows_in == 7 and summary.rows_out == len(out) == 5
    for row, prompt in zip(out, prompts, strict=True):
        assert row["messages"][:-1] == prompt  # earlier turns untouched
        assert row["messages"][-1]["role"] == "assistant"
        text, prompt_ids, response_ids = _greedy_reference(tiny_target, prompt, max_new_tokens=12)
        assert row["messages"][-1]["content"] == text
        assert (row["prompt_ids"], row["response_ids"]) == (prompt_ids, response_ids)  # exactly what it read/wrote
    assert out[4]["id"] == "mt" and "conversations" not in out[3]
    assert out[4]["messages"][-1]["content"] != "the dataset's answer, to be replaced"


def _regenerate_argv(target: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "regenerate",
        "--target",
        str(target),
        "--data",
        str(data),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "16",
        *extra,
    ]


def _recorded_shards(out: Path) -> int:
    """Shards the manifest lists as complete (a shard file is renamed into place just before the manifest)."""
    try:
        return len(json.loads((shards_dir(out) / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_target, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in stdlib_chat_rows("held_out", 16, seed=1)])
    assert main(_regenerate_argv(tiny_target, data, tmp_path / "ref.jsonl")) == 0

    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nemo_automodel_dspark", *_regenerate_argv(tiny_target, data, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_shard = shards_dir(out) / "shard_00000.jsonl"
    deadline = time.monotonic() + 60
    while not _recorded_shards(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((shards_dir(out) / "manifest.json").read_text())
    assert first_shard.exists() and not out.exists() and 1 <= len(manifest["shards"]) < 8, "the run was not cut short"

    assert main([*_regenerate_argv(tiny_target, data, out, "--resume", "--temperature", "0.7")]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main([*_regenerate_argv(tiny_target, data, out)]) == 2  # neither --resume nor --overwrite: refused
    killed = [shards_dir(out) / ".shard_00007.jsonl.0123456789ab", tmp_path / ".out.jsonl.a1b2c3d4e5f6"]
    for path in killed:  # what a kill inside a shard write and inside the final concatenation leave
        path.write_bytes(b"half")
    assert main([*_regenerate_argv(tiny_target, data, out, "--resume")]) == 0
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert not any(path.exists() for path in killed)
    assert len(_read_jsonl(out)) == 16


def test_an_output_is_up_to_date_only_for_the_same_target_files_and_settings(tiny_target, tmp_path, capsys):
    import shutil

    target = tmp_path / "target"
    shutil.copytree(tiny_target, target)
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in stdlib_chat_rows("held_out", 2, seed=1)])
    config = RegenerateConfig(data=str(data), out=str(tmp_path / "o.jsonl"), target=str(target), max_new_tokens=4)
    assert not is_up_to_date(config)
    regenerate(config)
    assert is_up_to_date(config)
    assert not is_up_to_date(RegenerateConfig(**{**config.__dict__, "max_new_tokens": 5}))
    argv = ["regenerate", "--target", str(target), "--data", str(data), "--out", config.out, "--max-new-tokens", "4"]
    for name in ("model.safetensors", "tokenizer.json"):  # retrained, or its tokenizer fixed, in place
        changed = target / name
        os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 1))
        assert not is_up_to_date(config)
        assert main([*argv, "--resume"]) == 2 and "target_files" in capsys.readouterr().err
        assert main([*argv, "--overwrite"]) == 0 and is_up_to_date(config)
    manifest_path = shards_dir(config.out) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": 1}))  # a run of an older dspark: rows without ids
    assert main([*argv, "--resume"]) == 2 and "older dspark" in capsys.readouterr().err


class _FlakyChatServer(BaseHTTPRequestHandler):
    """Fails the first request for every prompt with HTTP 500, answers the second; "ALWAYS_FAIL" never succeeds."""

    calls: dict[str, int] = {}
    bodies: list[dict] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.calls[prompt] = self.calls.get(prompt, 0) + 1
            self.bodies.append(body)
            attempt = self.calls[prompt]
        if attempt == 1 or "ALWAYS_FAIL" in prompt or self.path != "/v1/chat/completions":
            self.send_error(500, "flaky")
            return
        message = {"role": "assistant", "content": "" if prompt == "EMPTY" else f"reply to {prompt}"}
        if "THINK" in prompt:
            message["reasoning_content"] = "hmm"
        payload = json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def flaky_server():
    _FlakyChatServer.calls, _FlakyChatServer.bodies = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_retries_then_answers_and_skips_a_dead_row(flaky_server, tmp_path):
    prompts = ["first", "second THINK", "ALWAYS_FAIL", "fourth", "EMPTY"]
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "old"}]} for p in prompts]
    rows[0].update(prompt_ids=[1, 2], response_ids=[3])  # ids of an earlier local run say nothing about the reply
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    config = RegenerateConfig(
        data=str(data),
        out=str(tmp_path / "out.jsonl"),
        server=flaky_server,
        model="tiny",
        concurrency=3,
        max_retries=2,
        retry_backoff_s=0.01,
        shard_size=3,
        max_new_tokens=7,
        progress=False,
    )
    summary = regenerate(config)

    out = _read_jsonl(tmp_path / "out.jsonl")
    assert [r["messages"][-1]["content"] for r in out] == ["reply to first", "reply to second THINK", "reply to fourth"]
    assert out[1]["messages"][-1]["reasoning_content"] == "hmm" and "reasoning_content" not in out[0]["messages"][-1]
    assert not any("prompt_ids" in r or "response_ids" in r for r in out)  # a server returns text, not ids
    assert [s["line"] for s in summary.skipped] == [3, 5] and "HTTP 500" in summary.skipped[0]["reason"]
    assert summary.skipped[1]["reason"] == "empty generation"
    assert _FlakyChatServer.calls == {"first": 2, "second THINK": 2, "ALWAYS_FAIL": 3, "fourth": 2, "EMPTY": 2}
    body = _FlakyChatServer.bodies[0]
    assert body["model"] == "tiny" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["messages"][-1]["role"] == "user"


def test_no_usable_row_is_a_one_line_error(flaky_server, tmp_path, capsys):
    row = {"messages": [{"role": "user", "content": "ALWAYS_FAIL"}, {"role": "assistant", "content": "old"}]}
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(row)])
    argv = ["regenerate", "--data", str(data), "--out", str(tmp_path / "out.jsonl"), "--server", flaky_server]
    assert main([*argv, "--model", "tiny", "--max-retries", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "dspark regenerate: error: no usable row was regenerated"


def test_row_parsing_and_reasoning_split():
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    sharegpt = json.dumps({"conversations": turns}).encode()
    assert parse_row(1, sharegpt).prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    with pytest.raises(RowError, match="no user turn"):
        parse_row(2, b'{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}')
    with pytest.raises(RowError, match="invalid JSON"):
        parse_row(3, b"\xff\xfe")
    assert split_reasoning("<think>\nwhy\n</think>\n\nanswer") == ("why", "answer")
    assert split_reasoning("just an answer") == (None, "just an answer")


def test_sampling_is_seeded_per_shard(tiny_target, tmp_path):
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in stdlib_chat_rows("held_out", 4, seed=2)])

    def run(name: str, **kwargs) -> list[str]:
        out = tmp_path / name
        config = RegenerateConfig(
            data=str(data),
            out=str(out),
            target=str(tiny_target),
            max_new_tokens=12,
            shard_size=2,
            progress=False,
            **kwargs,
        )
        regenerate(config)
        return [row["messages"][-1]["content"] for row in _read_jsonl(out)]

    sampled = run("a.jsonl", temperature=1.0, seed=5)
    assert run("b.jsonl", temperature=1.0, seed=5) == sampled  # same seed → same samples
    assert run("c.jsonl", temperature=1.0, seed=6) != sampled
    assert run("d.jsonl") != sampled  # greedy differs from sampling at temperature 1


def test_an_unreachable_hub_target_is_one_line_before_any_shard(monkeypatch, tmp_path, capsys):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["regenerate", "--target", "org/model", "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "dspark regenerate: error: --target org/model: not loadable from the Hub (We couldn't connect to "
        "'https://huggingface.co' to load the files.); without the Hub, give a local folder (HF_HUB_OFFLINE=1 "
        "fails at once)"
    )
    assert not shards_dir(out).exists() and not out.exists()
