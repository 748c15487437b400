"""Thin adapters to the frameworks, one folder each (megatron/, deepspeed/, hf/), with their CPU
workarounds beside them. They import the core (objectives, tables, ops) and never each other;
autotp.py holds DeepSpeed AutoTP's vocab-parallel head, which deepspeed/ and hf/ both run."""
