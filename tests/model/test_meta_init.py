"""A draft built on the meta device and materialised (sharded or not) equals the eager draft bit for bit."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter
from nemo_automodel_dspark.model.meta_init import materialize_draft, meta_draft
from nemo_automodel_dspark.target.tiny import tiny_config

# (family, target config fields, draft options): every head type, biases, and Gemma4 with keys reused as values
# (its attention builds a v_proj and drops it: those draws must still happen).
CASES = {
    "qwen3_rnn_confidence": (
        "qwen3",
        {},
        dict(markov_rank=8, markov_head_type="rnn", enable_confidence_head=True, confidence_head_with_markov=True),
    ),
    "qwen3_bias_gated": ("qwen3", {"attention_bias": True}, dict(markov_rank=8, markov_head_type="gated")),
    "gemma4_k_eq_v_vanilla": ("gemma4", {"attention_k_eq_v": True}, dict(markov_rank=4)),
    "gemma4_no_markov": ("gemma4", {}, dict(markov_rank=0, confidence_head_with_markov=False)),
}


def _case(name: str):
    family, fields, options = CASES[name]
    config = tiny_config(family, **fields)
    dspark = DSparkConfig(mask_token_id=5, draft_num_hidden_layers=2, block_size=4, **options)
    text = config.get_text_config()
    g = torch.Generator().manual_seed(7)
    embed = torch.randn(text.vocab_size, text.hidden_size, generator=g)
    lm_head = torch.randn(text.vocab_size, text.hidden_size, generator=g)
    return config, dspark, embed, lm_head


def _everything(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not), whole (sharded ones gathered: every rank must call this)."""
    from nemo_automodel_dspark.distributed import full_tensor

    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name.replace("_checkpoint_wrapped_module.", ""): full_tensor(t.detach()) for name, t in tensors.items()}


def _eager(config, dspark, embed, lm_head, seed: int) -> tuple[DSparkDrafter, torch.Tensor]:
    torch.manual_seed(seed)
    draft = DSparkDrafter.from_embeddings(config, dspark, embed, lm_head)
    return draft, torch.get_rng_state()


@pytest.mark.parametrize("name", list(CASES))
def test_meta_build_equals_eager_build(name):
    """Same tensors bit for bit, same trainable set, and the CPU generator left in the same state."""
    config, dspark, embed, lm_head = _case(name)
    eager, eager_rng = _eager(config, dspark, embed, lm_head, seed=3)
    torch.manual_seed(3)
    draft = meta_draft(config, dspark)
    assert all(t.is_meta for t in draft.parameters())
    materialize_draft(draft, torch.device("cpu"), embed, lm_head)
    assert torch.equal(torch.get_rng_state(), eager_rng)
    a, b = _everything(eager), _everything(draft)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(draft) == trainable(eager) and "lm_head.weight" not in trainable(draft)
    assert torch.equal(b["lm_head.weight"], lm_head) and torch.equal(b["embed_tokens.weight"], embed)


@pytest.mark.parametrize("draw", ["uniform", "normal"])
def test_dropped_draws_advance_the_generator_exactly(draw):
    """A draw on a meta tensor takes the CPU generator exactly as far as the real draw does, without holding the
    tensor (a size over two scratch chunks, not a multiple of 16, where `normal_` redraws its last 16 values)."""
    from nemo_automodel_dspark.model import meta_init

    numel = 2 * meta_init.SKIP_CHUNK + 3
    fill = (lambda t: t.uniform_(-1.0, 1.0)) if draw == "uniform" else (lambda t: t.normal_(0.0, 0.02))
    assert meta_init.advancing_is_exact()  # so the chunked path is the one under test here
    torch.manual_seed(5)
    fill(torch.empty(numel))
    real = torch.get_rng_state()
    torch.manual_seed(5)
    with meta_init.CpuDraws():
        fill(torch.empty(numel, device="meta"))
    assert torch.equal(torch.get_rng_state(), real)


def test_full_scratch_draws_give_the_same_draft(monkeypatch):
    """Where advancing by count could not be trusted, full scratch draws give the same weights."""
    from nemo_automodel_dspark.model import meta_init

    monkeypatch.setattr(meta_init, "advancing_is_exact", lambda: False)
    config, dspark, embed, lm_head = _case("gemma4_k_eq_v_vanilla")
    eager, eager_rng = _eager(config, dspark, embed, lm_head, seed=3)
    torch.manual_seed(3)
    draft = meta_draft(config, dspark)
    materialize_draft(draft, torch.device("cpu"), embed, lm_head)
    a, b = _everything(eager), _everything(draft)
    assert torch.equal(torch.get_rng_state(), eager_rng) and all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_gives_other_weights():
    """The comparison above can fail: the seed reaches the replayed draws."""
    config, dspark, embed, lm_head = _case("qwen3_bias_gated")
    eager, _ = _eager(config, dspark, embed, lm_head, seed=3)
    torch.manual_seed(4)
    draft = meta_draft(config, dspark)
    materialize_draft(draft, torch.device("cpu"), embed, lm_head)
    assert not torch.equal(draft.fc.weight, eager.fc.weight)


def test_a_module_without_reset_parameters_is_refused():
    config, dspark, embed, lm_head = _case("qwen3_bias_gated")
    draft = meta_draft(config, dspark)
    draft.extra = nn.Module()
    draft.extra.scale = nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match=r"Module holds \['scale'\] but has no reset_parameters"):
        materialize_draft(draft, torch.device("cpu"), embed, lm_head)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, saved: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from nemo_automodel_dspark import distributed as D
    from nemo_automodel_dspark.recipe.sharded_draft import build_draft

    info = D.init_distributed("gloo", 5)
    report = {}
    for name in CASES:
        config, dspark, embed, lm_head = _case(name)
        for warm in (None, saved) if name == "qwen3_rnn_confidence" else (None,):
            eager, eager_rng = _eager(config, dspark, embed, lm_head, seed=11)
            if warm:
                from nemo_automodel_dspark.model.warm_start import load_warm_start

                load_warm_start(eager, warm)
            draft, model = build_draft(
                config, dspark, embed, lm_head, info=info, strategy="fsdp2", activation_checkpointing=True, seed=11,
                warm_start=warm,
            )  # fmt: skip
            rng_equal = torch.equal(torch.get_rng_state(), eager_rng)
            a, b = _everything(eager), _everything(model)
            report[f"{name}{'_warm' if warm else ''}"] = {
                "same_names": sorted(a) == sorted(b),
                "unequal": [k for k in a if k in b and not torch.equal(a[k], b[k])],
                "rng_equal": rng_equal,
                "sharded": model is draft and draft.fc.weight.__class__.__name__ == "DTensor",
                "local_bytes": D.local_bytes(model),
                "full_bytes": D.local_bytes(eager),
            }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    D.destroy()


@pytest.mark.slow  # two processes
def test_sharded_meta_build_gathers_to_the_eager_draft(tmp_path):
    """FSDP2 over 2 gloo ranks, activation checkpointing on, fresh and warm-started: gathered weights equal the
    eager draft's bit for bit on both ranks, and each rank holds about half of the draft's bytes."""
    config, dspark, embed, lm_head = _case("qwen3_rnn_confidence")
    torch.manual_seed(99)
    other = DSparkDrafter.from_embeddings(config, dspark, embed, lm_head)
    other.save_pretrained(tmp_path / "saved")  # a warm start unlike the fresh draft
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "saved"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(report) == {*CASES, "qwen3_rnn_confidence_warm"}
        for name, r in report.items():
            assert r["same_names"] and r["unequal"] == [] and r["rng_equal"] and r["sharded"], (rank, name, r)
            assert r["local_bytes"] / r["full_bytes"] == pytest.approx(0.5, abs=0.05), (rank, name)


@pytest.mark.parametrize("exact", [True, False])
def test_a_draw_on_a_real_tensor_happens_once(monkeypatch, exact):
    """Inside CpuDraws a seeded op on a CPU tensor (a constructor may draw on one) is run once, as in an eager build,
    not replayed on a scratch copy first."""
    from nemo_automodel_dspark.model import meta_init

    monkeypatch.setattr(meta_init, "advancing_is_exact", lambda: exact)
    torch.manual_seed(5)
    want = torch.empty(40).normal_()
    real = torch.get_rng_state()
    torch.manual_seed(5)
    with meta_init.CpuDraws():
        got = torch.empty(40).normal_()
    assert torch.equal(got, want) and torch.equal(torch.get_rng_state(), real)


def test_advancing_does_not_follow_the_default_dtype():
    """The scratch that advances the generator is fp32 whatever the default dtype (a float64 one takes 64-bit draws)."""
    from nemo_automodel_dspark.model import meta_init

    assert meta_init.advancing_is_exact()
    torch.manual_seed(5)
    torch.empty(40, dtype=torch.float32).uniform_()
    real = torch.get_rng_state()
    torch.manual_seed(5)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with meta_init.CpuDraws():
            torch.empty(40, dtype=torch.float32, device="meta").uniform_()
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(torch.get_rng_state(), real)


def test_the_start_up_check_reseeds_no_accelerator(monkeypatch):
    """`advancing_is_exact` seeds and restores the CPU generator only: `torch.manual_seed` would also reseed every
    CUDA generator to its probe seed, replacing the run's seed there."""
    from nemo_automodel_dspark.model import meta_init

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    meta_init.advancing_is_exact.cache_clear()
    try:
        state = torch.get_rng_state()
        assert meta_init.advancing_is_exact()
        assert seeded == [] and torch.equal(torch.get_rng_state(), state)
    finally:
        meta_init.advancing_is_exact.cache_clear()
