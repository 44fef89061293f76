"""Vision helpers that need no torch: the synthetic image and question generator for vlm-1."""
