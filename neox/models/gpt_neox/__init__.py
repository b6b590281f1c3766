"""gpt_neox."""
