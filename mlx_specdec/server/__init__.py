"""OpenAI-compatible HTTP server (`mlx-specdec serve`): route families (`chat.py`,
`completions.py`) on a shared streaming layer (`streaming.py`), wired up in `app.py` and run by
`shutdown.py`, in front of one speculative-decoding worker (`engine.py`). Kept import-free so the
CLI loads without the `server` extra installed."""
