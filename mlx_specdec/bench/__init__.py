"""`mlx-specdec bench` and `bench-prefix`: `cli` (the bench subcommand), `run` (the race on real
models), `synthetic` (imposed acceptance on random weights), `prefix` (prefix-cache TTFT),
`report` (tables, verdict, plot, JSON) and `prompts`."""
