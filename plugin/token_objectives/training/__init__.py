"""What both training loops share (run loop, signals, checkpoints, metrics, YAML config, data),
and the Megatron-Core and DeepSpeed loops built on it."""
