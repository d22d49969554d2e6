"""Format-neutral pieces of the exporters (sharded safetensors writing)."""
