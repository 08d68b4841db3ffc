"""Command-line entry points (console scripts in pyproject.toml): `hfna-train` (needs the [train] extra) and
`hfna-retrofit`. Not shipped with checkpoints."""
