"""Thin adapters to the frameworks, one folder each, with their CPU workarounds beside them.
They import the core (objectives, tables, ops) and never each other."""
