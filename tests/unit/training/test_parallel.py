"""kilter.training.parallel in one process: which modules FSDP shards, and what stays plain."""

from __future__ import annotations

import json

import pytest
import torch

from kilter.distributed import DistInfo
from kilter.errors import KilterError
from kilter.models import load_causal_lm, load_tokenizer
from kilter.models.lora import LoraSection, apply_lora
from kilter.models.packed import fast_causal_lm
from kilter.training.checkpoint import resume_from
from kilter.training.parallel import _groups_outside, decoder_blocks, gathered, is_sharded, wrap_model


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("builtin:tiny")
    return tokenizer, load_causal_lm("builtin:tiny", tokenizer)


def test_blocks_and_the_groups_outside_them(tiny):
    _, model = tiny
    blocks = decoder_blocks(model)
    assert blocks == list(model.model.layers)  # the _no_split_modules class, in order
    wrapper, _ = fast_causal_lm(model, "cpu")
    groups = _groups_outside(blocks, model, wrapper)
    names = {id(m): n for n, m in model.named_modules()}
    named = sorted(sorted(names[id(m)] for m in g) for g in groups)
    # tied embeddings and head share a tensor: one group; the final norm its own
    assert named == [["lm_head", "model.embed_tokens"], ["model.norm"]]
    owned = {id(p) for g in groups for m in g for p in m.parameters(recurse=False)}
    inside = {id(p) for b in blocks for p in b.parameters()}
    assert owned | inside == {id(p) for p in model.parameters()}  # every weight has a group


def test_lora_blocks_hold_their_adapters(tiny):
    tokenizer, _ = tiny
    model = apply_lora(load_causal_lm("builtin:tiny", tokenizer), LoraSection(enabled=True, r=4))
    blocks = decoder_blocks(model)
    assert len(blocks) == 4
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    assert lora and all(id(dict(model.named_parameters())[n]) in in_blocks for n in lora)


def test_one_process_is_left_alone(tiny):
    _, model = tiny

    class Cfg:
        parallel, precision = "fsdp", "fp32"

    assert wrap_model(model, model, Cfg, DistInfo()) is model
    assert not is_sharded(model)
    with gathered(model) as inside:  # a no-op without FSDP
        assert inside is model


def test_a_sharded_checkpoint_is_refused_by_an_unsharded_run(tiny, tmp_path):
    _, model = tiny
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "trainer": "sft", "layout": "sharded"}))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(KilterError, match="written with parallel=fsdp.*resume with parallel=fsdp"):
        resume_from(tmp_path, None, model, opt, None)
