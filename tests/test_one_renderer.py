"""One chat row, one prompt: training, `dspark regenerate` and `dspark evaluate` read and render it to the same ids,
with the same custom `chat_template`, for OpenAI and ShareGPT rows and for the token-id rows regenerate writes."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers.recipe_assets import TEMPLATE, build_target_dir
from transformers import AutoTokenizer

from nemo_automodel_dspark.cli import build_parser
from nemo_automodel_dspark.data.dataset import DSparkChatDataset
from nemo_automodel_dspark.inference.prompts import load_prompts
from nemo_automodel_dspark.tools.regenerate import RegenerateConfig, config_from_args, regenerate

# Differs from the tokenizer's own template by a marker word after every role header, so a tool that ignored the
# custom template would render other ids.
CUSTOM = TEMPLATE.replace("{{ m['role'] }}\n", "{{ m['role'] }} w39\n").replace(
    "assistant\n{% endif", "assistant w39\n{% endif"
)
OPENAI = {
    "id": "r1",
    "messages": [
        {"role": "system", "content": "w0 w1"},
        {"role": "user", "content": [{"type": "text", "text": "w2 w3 "}, {"type": "text", "text": "w4"}]},
        {"role": "assistant", "content": "w5 w6 w7"},
    ],
}
SHAREGPT = {
    "id": "r2",
    "conversations": [
        {"from": "system", "value": "w0 w1"},
        {"from": "human", "value": "w2 w3 w4"},
        {"from": "gpt", "value": "w5 w6 w7"},
    ],
}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    torch.set_num_threads(1)
    return build_target_dir(tmp_path_factory.mktemp("render") / "target")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _training_rows(path, tokenizer, template):
    dataset = DSparkChatDataset(str(path), tokenizer, seq_length=64, chat_template=template, show_progress=False)
    assert not dataset.skipped
    return [dataset[i] for i in range(len(dataset))]


def test_training_regenerate_and_evaluate_render_a_row_to_the_same_ids(target, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(target)
    data = _write(tmp_path / "rows.jsonl", [OPENAI, SHAREGPT])
    expected = tokenizer(
        "<|im_start|>system w39\nw0 w1<|im_end|>\n<|im_start|>user w39\nw2 w3 w4<|im_end|>\n"
        "<|im_start|>assistant w39\n",
        add_special_tokens=False,
    )["input_ids"]

    evaluated = [p.ids for p in load_prompts(data, tokenizer, chat_template=CUSTOM)]
    args = build_parser().parse_args(
        [
            "regenerate",
            "--target",
            str(target),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "regen.jsonl"),
            "--max-new-tokens",
            "3",
            "--chat-template",
            CUSTOM,
        ]
    )
    config = config_from_args(args)
    assert config.chat_template == CUSTOM
    regenerate(RegenerateConfig(**{**vars(config), "progress": False}))
    regenerated = [json.loads(line) for line in (tmp_path / "regen.jsonl").read_text().splitlines()]
    trained = _training_rows(data, tokenizer, CUSTOM)

    assert evaluated == [expected, expected]
    assert [r["prompt_ids"] for r in regenerated] == [expected, expected]
    for row in trained:  # training: the prompt is the context, supervision starts right after it
        assert row["input_ids"][: len(expected)].tolist() == expected
        assert row["loss_mask"][: len(expected)].sum() == 0 and row["loss_mask"][len(expected)] == 1

    # The rows regenerate wrote carry the ids: all three use them as they are.
    regen_file = tmp_path / "regen.jsonl"
    assert [p.ids for p in load_prompts(regen_file, tokenizer, chat_template=CUSTOM)] == [expected, expected]
    for row, written in zip(_training_rows(regen_file, tokenizer, CUSTOM), regenerated, strict=True):
        assert row["input_ids"].tolist() == written["prompt_ids"] + written["response_ids"]

    # Without the override every tool falls back to the tokenizer's own template, and the ids differ.
    own = [p.ids for p in load_prompts(data, tokenizer)]
    assert own[0] != expected and own[0] == tokenizer.apply_chat_template(
        [{"role": "system", "content": "w0 w1"}, {"role": "user", "content": "w2 w3 w4"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def test_evaluate_takes_the_same_option():
    argv = ["evaluate", "--target", "t", "--draft", "d", "--data", "x", "--output", "o", "--chat-template", CUSTOM]
    assert build_parser().parse_args(argv).chat_template == CUSTOM


def test_a_jinja_file_is_the_same_template_everywhere(target, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(target)
    path = tmp_path / "custom.jinja"
    path.write_text(CUSTOM)
    data = _write(tmp_path / "rows.jsonl", [OPENAI])
    assert load_prompts(data, tokenizer, chat_template=str(path)) == load_prompts(data, tokenizer, chat_template=CUSTOM)


def test_regenerate_refuses_a_template_it_cannot_apply_to_a_server(tmp_path):
    from nemo_automodel_dspark.errors import ToolError

    with pytest.raises(ToolError, match="--chat-template applies to local generation"):
        RegenerateConfig(data="d", out="o", server="http://x", model="m", chat_template=CUSTOM)
