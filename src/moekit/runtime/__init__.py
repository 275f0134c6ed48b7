"""Running MoE models: decode path, expert store and caches, prefetch, token scheduling, trace replay."""
