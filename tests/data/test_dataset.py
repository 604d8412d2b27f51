"""The tokenised dataset (skips, report, mask_token_id check), collate, and the exact-resume sampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from nemo_automodel_dspark.data.chat import split_reasoning, tokenize_conversation
from nemo_automodel_dspark.data.dataset import DSparkChatDataset, ResumableSampler, batches, collate

SEQ = 64


def good(conversation, answer: str = "hello world.") -> dict:
    return {"messages": conversation("hello", answer)}


def test_bad_rows_are_skipped_and_counted(tmp_path, tokenizer, conversation, write_jsonl):
    long_prompt = {"messages": conversation(" ".join(["numbers"] * 100), "five.")}
    rows = [
        good(conversation),  # 1
        "{not json",  # 2
        good(conversation, "paris."),  # 3
        {"messages": [{"role": "user", "content": "hello"}]},  # 4
        {"text": "hello"},  # 5
        long_prompt,  # 6: the answer is past seq_length
        "{also not json",  # 7
        {"messages": [{"role": "user", "content": "x"}]},  # 8
        good(conversation, "five."),  # 9
    ]
    dataset = DSparkChatDataset(str(write_jsonl(tmp_path / "train.jsonl", rows)), tokenizer, SEQ)
    assert len(dataset) == 3
    assert dataset.skipped == {
        "invalid JSON": 2,
        "no assistant turn": 2,
        "no 'messages' or 'conversations' key": 1,
        "nothing supervised after truncation": 1,
    }
    assert dataset.first_skipped == {
        "invalid JSON": 2,
        "no assistant turn": 4,
        "no 'messages' or 'conversations' key": 5,
        "nothing supervised after truncation": 6,
    }
    assert dataset.report() == (
        f"{tmp_path / 'train.jsonl'}: 3 rows used, 6 skipped (invalid JSON: 2, first at line 2; "
        "no assistant turn: 2, first at line 4; no 'messages' or 'conversations' key: 1, first at line 5; "
        "nothing supervised after truncation: 1, first at line 6)"
    )


def test_items_are_the_tokenised_rows(tmp_path, tokenizer, conversation, write_jsonl):
    answers = ["hello world.", "paris.", "the answer is a simple small list of numbers, two plus four."]
    path = write_jsonl(tmp_path / "train.jsonl", [good(conversation, a) for a in answers])
    dataset = DSparkChatDataset(str(path), tokenizer, 48)
    assert len(dataset) == 3 and dataset.num_truncated == 1
    for item, answer in zip(dataset, answers, strict=True):
        expected = tokenize_conversation(conversation("hello", answer), tokenizer, 48)
        assert item["input_ids"].dtype == item["loss_mask"].dtype == torch.long
        assert item["input_ids"].tolist() == expected.input_ids and item["loss_mask"].tolist() == expected.loss_mask
        assert item["input_ids"].ndim == 1 and item["input_ids"].numel() <= 48
    assert dataset.report().endswith("3 rows used, 0 skipped, 1 truncated to seq_length=48")


def test_zero_usable_rows_names_the_file(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "hello"}]}, "{bad"])
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable row \(no assistant turn: 1, first at line 1"):
        DSparkChatDataset(str(path), tokenizer, SEQ)


def test_mask_token_in_supervised_text_is_refused(tmp_path, tokenizer, conversation, write_jsonl):
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    in_prompt = {"messages": conversation("what is <|mask|>?", "hello world.")}
    in_answer = {"messages": conversation("hello", "it is <|mask|>.")}
    path = write_jsonl(tmp_path / "train.jsonl", [in_prompt, good(conversation)])
    assert len(DSparkChatDataset(str(path), tokenizer, SEQ, mask_token_id=mask_id)) == 2  # prompts may contain it
    path = write_jsonl(tmp_path / "train.jsonl", [in_prompt, good(conversation), in_answer])
    with pytest.raises(ValueError, match=rf"mask_token_id={mask_id} .* line 3"):
        DSparkChatDataset(str(path), tokenizer, SEQ, mask_token_id=mask_id)


def test_collate_right_pads_to_seq_length():
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1])},
        {"input_ids": torch.tensor([8, 9, 10, 11, 12]), "loss_mask": torch.tensor([0, 0, 1, 1, 1])},
    ]
    batch = collate(items, seq_length=6, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="seq_length=4"):
        collate(items, seq_length=4, pad_token_id=0)


def epoch_order(num_items: int, world_size: int, **kwargs) -> list[list[int]]:
    return [list(ResumableSampler(num_items, rank=r, world_size=world_size, **kwargs)) for r in range(world_size)]


@pytest.mark.parametrize("num_items", [10, 11])
def test_rank_shards_are_disjoint_equal_and_cover_the_permutation(num_items):
    shards = epoch_order(num_items, 2, seed=3)
    assert len(shards[0]) == len(shards[1]) == num_items // 2 == len(ResumableSampler(num_items, seed=3, world_size=2))
    assert not set(shards[0]) & set(shards[1])
    interleaved = [index for pair in zip(*shards, strict=True) for index in pair]
    assert interleaved == epoch_order(num_items, 1, seed=3)[0][: 2 * (num_items // 2)]  # strided over one order
    assert len(set(interleaved)) == len(interleaved)


def test_no_drop_last_pads_by_wrapping_so_ranks_stay_equal():
    shards = epoch_order(5, 2, seed=0, drop_last=False)
    assert len(shards[0]) == len(shards[1]) == 3
    assert set(shards[0]) | set(shards[1]) == set(range(5))


def test_order_depends_only_on_seed_and_epoch():
    assert epoch_order(50, 1, seed=7) == epoch_order(50, 1, seed=7)
    assert epoch_order(50, 1, seed=7) != epoch_order(50, 1, seed=8)
    sampler = ResumableSampler(50, seed=7)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == sorted(first) == list(range(50)) and second != first


def test_resume_continues_at_the_exact_next_item():
    data = list(range(100, 123))  # 23 items; any indexable dataset works
    uninterrupted = [b for b in batches(ResumableSampler(23, seed=1, rank=1, world_size=2), data, 3, list)]

    sampler = ResumableSampler(23, seed=1, rank=1, world_size=2)
    stream = batches(sampler, data, 3, list)
    before = [next(stream), next(stream)]
    state = sampler.state_dict()  # a checkpoint after two micro-batches
    assert state["epoch"] == 0 and state["consumed"] == 6

    resumed = ResumableSampler(23, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the usual call at the top of the epoch loop keeps the position
    after = list(batches(resumed, data, 3, list))
    assert before + after == uninterrupted  # last micro-batch is the smaller remainder (11 = 3 + 3 + 3 + 2)
    assert [len(b) for b in after] == [3, 2]

    resumed.set_epoch(1)  # a new epoch starts at its first item
    assert resumed.consumed == 0 and len(list(resumed)) == len(resumed) == 11


def test_dataloader_without_workers_counts_exactly():
    sampler = ResumableSampler(20, seed=0)
    loader = DataLoader(list(range(20)), batch_sampler=BatchSampler(sampler, 4, drop_last=False), collate_fn=list)
    stream = iter(loader)
    next(stream), next(stream)
    assert sampler.consumed == 8


def test_resume_refuses_another_seed_or_world_size():
    state = ResumableSampler(20, seed=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="seed=0, now 1"):
        ResumableSampler(20, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=2, now 4"):
        ResumableSampler(20, seed=0, world_size=4).load_state_dict(state)


# ------------------------------------------------------------------------------ rows with the target's own ids
def _ids_row(tokenizer, conversation, response_ids: list[int]) -> dict:
    """A row as `dspark regenerate` writes it: messages + the prompt ids it fed + the ids the target wrote."""
    messages = conversation("hello", "")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    messages[-1]["content"] = tokenizer.decode(response_ids, skip_special_tokens=True)
    return {
        "messages": messages,
        "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
        "response_ids": response_ids,
    }


def test_token_id_rows_are_used_as_written_not_retokenised(tmp_path, tokenizer, conversation, write_jsonl):
    """A response the target spelled one byte-token at a time stays that way: it is what the draft will meet."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spelled = [tokenizer.convert_tokens_to_ids(c) for c in "hello"] + [eos]  # not BPE's segmentation of "hello"
    row = _ids_row(tokenizer, conversation, spelled)
    assert tokenizer("hello", add_special_tokens=False)["input_ids"] != spelled[:-1]
    dataset = DSparkChatDataset(str(write_jsonl(tmp_path / "d.jsonl", [row])), tokenizer, SEQ)
    item = dataset[0]
    assert item["input_ids"].tolist() == row["prompt_ids"] + spelled
    assert item["loss_mask"].tolist() == [0] * len(row["prompt_ids"]) + [1] * len(spelled)
    assert dataset.num_token_ids == 1 and "1 as the target's own token ids" in dataset.report()


def test_token_id_rows_agree_with_the_text_path_when_the_segmentation_is_canonical(
    tmp_path, tokenizer, conversation, write_jsonl
):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    canonical = tokenizer("hello world.", add_special_tokens=False)["input_ids"] + [eos]
    row = _ids_row(tokenizer, conversation, canonical)
    text_row = {"messages": row["messages"]}
    exact, text = (
        DSparkChatDataset(str(write_jsonl(tmp_path / f"{name}.jsonl", [r])), tokenizer, SEQ)[0]
        for name, r in (("ids", row), ("text", text_row))
    )
    n = exact["input_ids"].numel()  # the text path also renders the "\n" after the end token (unsupervised)
    assert torch.equal(exact["input_ids"], text["input_ids"][:n])
    assert torch.equal(exact["loss_mask"], text["loss_mask"][:n]) and not text["loss_mask"][n:].any()


def test_token_ids_that_do_not_match_the_row_are_skipped_with_the_line(tmp_path, tokenizer, conversation, write_jsonl):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ok = _ids_row(tokenizer, conversation, tokenizer("hello", add_special_tokens=False)["input_ids"] + [eos])
    edited = {**ok, "messages": conversation("hello", "an edited answer")}  # ids no longer say what the row says
    out_of_range = {**ok, "response_ids": [len(tokenizer) + 5]}
    rows = [ok, edited, ok, out_of_range]
    dataset = DSparkChatDataset(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer, SEQ)
    assert len(dataset) == 2
    reasons = {reason.split(" (")[0].split(":")[0]: line for reason, line in dataset.first_skipped.items()}
    assert reasons == {"response_ids do not decode to the final assistant message": 2, "bad response_ids": 4}


def test_mask_reasoning_content_unsupervises_the_think_block_of_token_ids(
    tmp_path, tokenizer, conversation, write_jsonl
):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reasoning = ids("<think>\nplan first\n</think>\n\n")
    row = _ids_row(tokenizer, conversation, reasoning + ids("hello world.") + [eos])
    path = str(write_jsonl(tmp_path / "d.jsonl", [row]))
    mask = DSparkChatDataset(path, tokenizer, SEQ, mask_reasoning_content=True)[0]["loss_mask"].tolist()
    prompt = len(row["prompt_ids"])
    assert mask == [0] * (prompt + len(reasoning)) + [1] * (len(row["response_ids"]) - len(reasoning))
    assert sum(DSparkChatDataset(path, tokenizer, SEQ)[0]["loss_mask"].tolist()) == len(row["response_ids"])


def test_token_id_rows_that_cannot_be_trained_on_are_skipped_not_fatal(tmp_path, tokenizer, conversation, write_jsonl):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, pad, mask_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|mask|>"))
    ok = _ids_row(tokenizer, conversation, ids("hello world.") + [eos])
    padded = _ids_row(tokenizer, conversation, ids("hello world.") + [eos, pad, pad])  # pads after the end
    masked = _ids_row(tokenizer, conversation, ids("hello") + [mask_id] + ids(" world.") + [eos])
    cut = _ids_row(tokenizer, conversation, ids("hello world."))  # stopped by max_new_tokens: no end token ...
    cut["messages"][-1]["content"] = tokenizer.decode(cut["response_ids"][:-1])  # ... so all of it must match
    half = {k: v for k, v in ok.items() if k != "prompt_ids"}
    nulls = {**ok, "prompt_ids": None, "response_ids": None}  # a table mixing server rows: the text path
    rows = [ok, padded, masked, cut, half, nulls]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    dataset = DSparkChatDataset(path, tokenizer, SEQ, mask_token_id=mask_id)  # no ValueError: the row is skipped
    assert len(dataset) == 2 and dataset.num_token_ids == 1
    assert {reason.split(" (")[0]: line for reason, line in dataset.first_skipped.items()} == {
        "response_ids hold an end or pad token before their last token": 2,
        "the target wrote mask_token_id in response_ids": 3,
        "response_ids do not decode to the final assistant message": 4,
        "prompt_ids and response_ids go together: the row has only one of them": 5,
    }
    text_path = str(write_jsonl(tmp_path / "t.jsonl", [{"messages": ok["messages"]}]))
    assert torch.equal(dataset[1]["input_ids"], DSparkChatDataset(text_path, tokenizer, SEQ)[0]["input_ids"])


@pytest.mark.parametrize("closed", [True, False])
def test_reasoning_in_token_ids_is_unsupervised_like_the_text_path(
    tmp_path, qwen3_tokenizer, conversation, write_jsonl, closed
):
    """Think tags that decoding keeps (Qwen3): a closed block and the whitespace after it are unsupervised, an
    unclosed one (cut by max_new_tokens) to the end."""
    tok = qwen3_tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    reasoning = ids("<think>\nplan first\n</think>\n\n" if closed else "<think>\nplan first and then")
    answer = ids("hello world.") + [eos] if closed else []
    row = _ids_row(tok, conversation, reasoning + answer)
    row["messages"][-1]["content"] = split_reasoning(tok.decode(row["response_ids"], skip_special_tokens=True))[1]
    path = str(write_jsonl(tmp_path / "d.jsonl", [row, _ids_row(tok, conversation, ids("ok.") + [eos])]))
    dataset = DSparkChatDataset(path, tok, SEQ, mask_reasoning_content=True)
    if closed:
        mask = dataset[0]["loss_mask"].tolist()
        assert mask == [0] * (len(row["prompt_ids"]) + len(reasoning)) + [1] * len(answer)
    else:  # nothing left to supervise: skipped, as the text path skips it
        assert len(dataset) == 1 and dataset.first_skipped == {"no supervised token": 1}
