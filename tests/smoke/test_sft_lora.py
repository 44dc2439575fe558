"""LoRA SFT: only the adapters train; final/ is a merged plain model, or the adapter alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main
from kilter.models.loading import resolve_model_path
from kilter.runs import read_metrics

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from kilter.data.task import build_task

    path = tmp_path_factory.mktemp("lora-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in build_task(seed=3, n_demonstrations=300).demonstrations))
    return path


def _run(out: Path, train: Path, *extra: str) -> int:
    return main(["sft", f"output_dir={out}", f"data.train={train}", "data.eval=null", "n_samples=0",
                 "tensorboard=false", "lora.enabled=true", "batch_size=16", *extra])


def test_lora_trains_adapters_only_and_merges(train_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, train_file, "max_steps=30", "optim.lr=1e-2", "log_every=5", "save_every=30") == 0
    m = re.search(r"([\d.]+)M of ([\d.]+)M parameters trainable", capsys.readouterr().out)
    trainable, total = float(m.group(1)), float(m.group(2))
    assert 0 < trainable < total / 5

    losses = [r["loss/sft"] for r in read_metrics(out) if "loss/sft" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses

    base = load_file(str(Path(resolve_model_path("builtin:tiny")) / "model.safetensors"))
    merged = load_file(str(out / "final" / "model.safetensors"))
    assert not (out / "final" / "adapter_config.json").exists()
    assert set(merged) == set(base)  # plain parameter names, no lora_A / base_layer left
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed, "merging the adapters changed nothing"
    assert all(any(part in name for part in ADAPTED) for name in changed), sorted(changed)  # embeddings, norms frozen
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)

    # the checkpoint holds the adapter only, not a second copy of the base
    ckpt = out / "checkpoints" / "step-30"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = tok("Write a review of the lamp.\n", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_lora_without_merge_saves_the_adapter(train_file, tmp_path):
    out = tmp_path / "run"
    assert _run(out, train_file, "max_steps=2", "lora.merge_on_save=false", "lora.r=4") == 0
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4

    from kilter.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(final))
    model = load_causal_lm(str(final), tok)  # the base is found through adapter_config.json
    with torch.no_grad():
        logits = model(**tok("a lamp", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
