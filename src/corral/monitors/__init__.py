"""Monitors: host-side observers of sandboxes (processes, resources, GPUs)."""
