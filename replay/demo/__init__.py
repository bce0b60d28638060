"""The embedded default: a tiny but real RL run on the CPU, recorded end to end.

``replay demo`` trains a tiny Qwen2 with GRPO advantages and a clipped policy
objective on a toy task with a verifiable reward, through a PipelineRL-like
pipeline (the engine generates the next batch while the trainer trains on the
last; new weights reach the engine mid-generation). It records a V0-reference run,
a V1 run, V1 with all four fixes and the ablations, and shows where and how far
each departs from V0.
"""
