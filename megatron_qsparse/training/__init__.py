"""Training: setup (processes, data, model, DeepSpeed engine), the loop, checkpoints, logging."""
