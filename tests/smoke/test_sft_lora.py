"""LoRA SFT: only the adapters train; final/ is a merged plain model, or the adapter alone.

The base is the shared SFT model (``sft_model_dir``): adapters on a randomly initialised
model learn little (embeddings and norms stay frozen), while on a trained model they adapt
it quickly to a new prompt format, which is what LoRA is for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main
from kilter.runs import read_metrics

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """Demonstrations in a format the SFT model never saw: chat messages with a system turn."""
    from kilter.data.task import build_task

    rows = [{"messages": [{"role": "system", "content": "Write a short review."},
                          {"role": "user", "content": d["prompt"]},
                          {"role": "assistant", "content": d["completion"]}]}
            for d in build_task(seed=3, n_demonstrations=256).demonstrations]
    path = tmp_path_factory.mktemp("lora-data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(out: Path, base: Path, data: Path, *extra: str) -> int:
    return main(["sft", f"model={base}", f"output_dir={out}", f"data.train={data}", "n_samples=0",
                 "tensorboard=false", "lora.enabled=true", "batch_size=16", *extra])


def _eval_loss(folder: Path, data: Path) -> float:
    from kilter.data.sources import load_records
    from kilter.data.tokenize import encode_sft_records
    from kilter.distributed import DistInfo
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.trainers.sft import evaluate

    tok = load_tokenizer(str(folder))
    model = load_causal_lm(str(folder), tok)
    examples = encode_sft_records(tok, load_records(str(data), "demonstration").rows[:32], 256)
    return evaluate(model, examples, tok.pad_token_id, 32, "fp32", "cpu", DistInfo())["eval/loss"]


def test_lora_trains_adapters_only_and_merges(sft_model_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, sft_model_dir, chat_file, f"data.eval={chat_file}", "data.max_eval_examples=32",
                "max_steps=8", "optim.lr=5e-3", "log_every=4", "eval_every=8", "save_every=8") == 0
    m = re.search(r"([\d.]+)M of ([\d.]+)M parameters trainable", capsys.readouterr().out)
    trainable, total = float(m.group(1)), float(m.group(2))
    assert 0 < trainable < total / 5

    before = _eval_loss(Path(sft_model_dir), chat_file)
    (after,) = [r["eval/loss"] for r in read_metrics(out) if "eval/loss" in r]
    assert after < before - 0.15, (before, after)
    assert _eval_loss(out / "final", chat_file) == pytest.approx(after, rel=1e-4)  # merging keeps the function

    base = load_file(str(Path(sft_model_dir) / "model.safetensors"))
    merged = load_file(str(out / "final" / "model.safetensors"))
    assert not (out / "final" / "adapter_config.json").exists()
    assert set(merged) == set(base)  # plain parameter names, no lora_A / base_layer left
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert all(any(part in name for part in ADAPTED) for name in changed), sorted(changed)  # embeddings, norms frozen
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)

    # the checkpoint holds the adapter only, not a second copy of the base
    ckpt = out / "checkpoints" / "step-8"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = tok("Write a review of the lamp.\n", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_lora_without_merge_saves_the_adapter(sft_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    assert _run(out, sft_model_dir, chat_file, "data.eval=null", "max_steps=1", "batch_size=8",
                "lora.merge_on_save=false", "lora.r=4") == 0
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
