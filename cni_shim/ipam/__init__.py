"""The node's address pool: ENI limits, providers, allocator, checkpoint."""
