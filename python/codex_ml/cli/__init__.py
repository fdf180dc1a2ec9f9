"""Command-line entry points (absl): train, generate, ..."""
