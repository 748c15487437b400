"""Megatron-Core and Megatron-LM: the GPTModel loss hook, loss_func and the flags (hook.py), and
what megatron-core needs to run without a GPU (cpu_patches.py)."""
