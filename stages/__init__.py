"""Pipeline stages: each module one Stage class (or a few small ones of one kind).

Stages import `pipeline`'s core (events, runtime, config, session, model); `pipeline` never
imports stages, except its composition root (`pipeline.app`, `pipeline.cli`).
"""
