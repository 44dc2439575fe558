"""Reward sources for RL: reward models, Python functions, BLEU/ROUGE against references, weighted sums.

Every reward function has the signature ``f(prompts, responses, **kw) -> list[float]``.
"""
