"""megatron_ext."""
