"""Plain ``nn.Module`` models: SAM (builder + batched decode), DINOv2, GNN Q-networks."""
