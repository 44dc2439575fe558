"""LoRA layers run their B product, scaling and sum as one addmm: peft's numbers, peft's behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear

from kilter import fastpaths
from kilter.models import lora


def _unfused(model):
    """A copy of ``model`` whose LoRA layers run peft's own forward."""
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, LoraLinear):
            m.__class__ = LoraLinear
    return other


def _logits_and_grads(model, ids, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def pair(micro_policy):
    torch.manual_seed(0)
    fastpaths.configure()
    tok, model = micro_policy(lora=True)  # random B, so the adapters matter
    return tok, model, _unfused(model)


def test_every_lora_layer_is_fused_and_gives_pefts_logits_and_gradients(pair):
    tok, fused, plain = pair
    layers = [m for m in fused.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is lora.FusedLoraLinear for m in layers)
    assert fastpaths.record()["perf/fused_lora"] == 1.0
    ids = torch.randint(0, len(tok), (3, 11), generator=torch.Generator().manual_seed(2))
    want, want_g = _logits_and_grads(plain, ids)
    got, got_g = _logits_and_grads(fused, ids)
    with torch.no_grad(), plain.disable_adapter():
        assert float((want - plain(input_ids=ids).logits).abs().max()) > 1e-3  # the adapters change them
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want_g.keys() == got_g.keys() and any("lora_A" in n for n in got_g)
    for name, g in want_g.items():
        assert torch.allclose(got_g[name], g, atol=1e-5 * max(1.0, float(g.abs().max()))), name
    # under bf16 autocast too (the products in bf16 in both)
    want, _ = _logits_and_grads(plain, ids, autocast=True)
    got, _ = _logits_and_grads(fused, ids, autocast=True)
    assert torch.allclose(got, want, atol=0.05, rtol=0.02)


def test_disabled_adapters_merging_and_saving_behave_as_in_peft(pair, tmp_path):
    tok, fused, plain = pair
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with fused.disable_adapter(), plain.disable_adapter():  # the shared-base reference
            assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        adapted = fused(input_ids=ids).logits
        merged = copy.deepcopy(fused).merge_and_unload()
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)
    fused.save_pretrained(tmp_path)  # the adapter folder peft writes, weights unchanged
    assert (tmp_path / "adapter_model.safetensors").is_file()
    buffer = __import__("io").BytesIO()
    torch.save(fused, buffer)  # picklable: the class is kilter.models.lora.FusedLoraLinear
    assert buffer.getvalue()


def test_a_fused_forward_that_disagrees_keeps_pefts_layers(micro_policy, monkeypatch, capsys):
    class Wrong(LoraLinear):
        def forward(self, x, *args, **kwargs):
            return super().forward(x, *args, **kwargs) * 1.01

    monkeypatch.setattr(lora, "_fused_class", lambda: Wrong)
    fastpaths.configure()
    _, model = micro_policy(lora=True)
    assert all(type(m) is LoraLinear for m in model.modules() if isinstance(m, LoraLinear))
    assert fastpaths.record()["perf/fused_lora"] == 0.0
    assert "fast path fused_lora is off" in capsys.readouterr().err
    assert float(next(m for m in model.modules() if isinstance(m, LoraLinear)).lora_B["default"].weight.abs().max()) \
        > 0  # the fixture's random B, put back after the probe
