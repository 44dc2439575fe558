"""One readable training loop per method (sft, rm, ppo, dpo, kto)."""
