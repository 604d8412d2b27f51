"""Reading the target's config.json: an unreachable Hub is one line naming the key, without the retry log."""

import logging

import pytest
import transformers

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.target.loading import load_target_config

HUB_LOGGER = "huggingface_hub.utils._http"


def unreachable_hub(*args, **kwargs):
    """What huggingface_hub does offline: log each failed try and each back-off, then give up."""
    log = logging.getLogger(HUB_LOGGER)
    url = "https://huggingface.co/org/model/resolve/main/config.json"
    for attempt in range(1, 3):
        log.warning(f"'[Errno -2] Name or service not known' thrown while requesting HEAD {url}")
        log.warning(f"Retrying in {attempt}s [Retry {attempt}/5].")
    log.warning("an unrelated warning of the same logger")
    raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")


def test_unreachable_hub_is_one_line_without_the_retry_log(monkeypatch):
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable_hub)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(HUB_LOGGER)
    logger.addHandler(handler)
    try:
        with pytest.raises(ToolError) as err:
            load_target_config("org/model", "recipe_args.target_model_name_or_path")
    finally:
        logger.removeHandler(handler)
    assert str(err.value) == (
        "recipe_args.target_model_name_or_path org/model: not loadable from the Hub (We couldn't connect to "
        "'https://huggingface.co' to load the files.); without the Hub, give a local folder (HF_HUB_OFFLINE=1 fails "
        "at once)"
    )
    assert seen == ["an unrelated warning of the same logger"]
    assert logger.filters == []  # the filter is gone once the config is read: later downloads log as before


def test_unreadable_local_config_names_the_file_without_the_hub_hint(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ToolError) as err:
        load_target_config(str(tmp_path), "--target")
    assert str(err.value).startswith(f"--target {tmp_path}: cannot read its config.json (")
    assert "HF_HUB_OFFLINE" not in str(err.value)
