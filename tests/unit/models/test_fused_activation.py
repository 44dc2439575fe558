"""GPT-2's tanh-GELU runs as one fused kernel: same logits and gradients, nothing saved changes."""

from __future__ import annotations

import pytest
import torch
import transformers.activations as acts
from transformers import AutoModelForCausalLM
from transformers.activations import GELUTanh, NewGELUActivation

from kilter import fastpaths
from kilter.errors import KilterError
from kilter.models import load_causal_lm, load_tokenizer
from kilter.models.loading import fuse_activations, resolve_model_path
from kilter.models.reward import load_reward_backbone


def _acts(model):
    return [type(m) for m in model.modules() if isinstance(m, (GELUTanh, NewGELUActivation))]


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gpt2_gets_the_fused_gelu_with_the_same_logits_and_gradients():
    fastpaths.configure()
    tok = load_tokenizer("builtin:gpt2-micro")
    fused = load_causal_lm("builtin:gpt2-micro", tok)
    plain = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:gpt2-micro"))
    plain.load_state_dict(fused.state_dict())
    assert set(_acts(fused)) == {GELUTanh} and set(_acts(plain)) == {NewGELUActivation}
    assert fastpaths.record()["perf/fused_activation"] == 1.0
    # scale the MLP inputs up so the activation sees its whole range, not only its linear middle
    with torch.no_grad():
        for model in (fused, plain):
            for block in model.transformer.h:
                block.mlp.c_fc.weight.mul_(20)
    ids = torch.randint(0, len(tok), (3, 12), generator=torch.Generator().manual_seed(0))
    want_logits, want_grads = _loss_and_grads(plain, ids)
    got_logits, got_grads = _loss_and_grads(fused, ids)
    assert float(want_logits.std()) > 0.1
    assert torch.allclose(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-4 * max(1.0, float(g.abs().max()))), name


def test_the_reward_backbone_is_fused_too_and_a_saved_model_still_says_gelu_new(tmp_path):
    tok = load_tokenizer("builtin:gpt2-micro")
    rm = load_reward_backbone("builtin:gpt2-micro", tok)
    assert set(_acts(rm)) == {GELUTanh}
    lm = load_causal_lm("builtin:gpt2-micro", tok)
    lm.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.activation_function == "gelu_new"
    assert set(_acts(AutoModelForCausalLM.from_pretrained(tmp_path))) == {NewGELUActivation}


def test_a_model_without_it_is_untouched():
    fastpaths.configure()
    model = load_causal_lm("builtin:micro", load_tokenizer("builtin:micro"))
    assert fuse_activations(model) == 0 and "perf/fused_activation" not in fastpaths.record()


def test_a_kernel_that_disagrees_keeps_the_models_own_module(monkeypatch, capsys):
    class Wrong(GELUTanh):
        def forward(self, input):
            return super().forward(input) * 1.001

    monkeypatch.setattr(acts, "GELUTanh", Wrong)
    fastpaths.configure()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:gpt2-micro"))
    assert fuse_activations(model) == 0
    assert set(_acts(model)) == {NewGELUActivation}
    assert fastpaths.record()["perf/fused_activation"] == 0.0
    assert "fast path fused_activation is off" in capsys.readouterr().err
    fastpaths.configure(strict=True)
    try:
        with pytest.raises(KilterError, match="fused_activation"):
            fuse_activations(model)
    finally:
        fastpaths.configure()  # later tests run with the default, lenient registry
