"""neox."""
