"""`megalodon-lm serve`: an OpenAI-compatible server whose sessions keep unlimited history at constant memory.

Modules: loading (run or HF directory, model fingerprint), template (chat text format), protocol (request
checks, OpenAI error shape), sampling (per-row generators), text (stop strings), engine (continuous
batching), store (SQLite sessions), sessions (ownership, LRU), service (turns), app (HTTP routes),
cli (the command). Needs the `serve` extra (starlette, uvicorn); see docs/serving.md.
"""
