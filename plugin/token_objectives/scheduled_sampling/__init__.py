"""Batch-scheduled sampling: the p schedules and the mixing of predicted tokens into the inputs,
on ops.sampling's vocab-parallel choices. Depends on the core, never the other way."""
