"""A tiny Llama-style model and a BPE tokenizer trained on the built-in task's own text.

Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on text Kilter
generates, and the model is randomly initialised with a fixed seed.  The architecture is
the same family as SmolLM2 (Llama), so the tiny model exercises the code paths that the
real preset uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kilter.errors import KilterError
from kilter.runs import save_folder_atomically

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A minimal chat template: each turn is "<|role|>content\n"; the generation prompt opens an
# assistant turn.  The completion is then followed by <|eos|> (added by the trainers).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (128, 4, 4, 384),
    "micro": (64, 2, 2, 192),
    "small": (256, 6, 8, 768),
}


def cache_dir() -> Path:
    root = os.environ.get("KILTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kilter")
    return Path(root)


def train_tokenizer(texts, vocab_size: int = 1024):
    """Byte-level BPE trained on ``texts``; PAD and EOS are distinct special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def build_model(tokenizer, size: str = "tiny", max_positions: int = 512, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for CPU tests (about 1M parameters for 'tiny')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_atomically(target: Path, write) -> Path:
    """Call ``write(tmpdir)`` and rename the folder into place; concurrent builders are safe."""
    return save_folder_atomically(target, write, keep_existing=True)


def builtin_model_dir(name: str = "tiny", seed: int = 0) -> Path:
    """Folder with the untrained built-in model + tokenizer (built once, then cached)."""
    size = name or "tiny"
    if size not in SIZES:
        raise KilterError(f"unknown built-in model {name!r}; choose one of "
                          + ", ".join(f"builtin:{n}" for n in SIZES))
    target = cache_dir() / "models" / f"builtin-{size}-s{seed}-v3"
    if (target / "config.json").is_file():
        return target

    def write(tmp: Path) -> None:
        from kilter.data.task import build_task

        task = build_task(seed=seed)
        # Held-out prompts join the tokenizer's text (vocabulary only, no completions), so
        # held-out product names are whole tokens the model can copy from the prompt.
        tokenizer = train_tokenizer(task.corpus + task.eval_prompts)
        model = build_model(tokenizer, size=size, seed=seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_atomically(target, write)
