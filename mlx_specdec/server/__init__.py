"""OpenAI-compatible HTTP server (`mlx-specdec serve`): FastAPI routes (`app.py`) in front of one
speculative-decoding worker (`engine.py`). Kept import-free so the CLI loads without the
`server` extra installed."""
