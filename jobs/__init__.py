"""Entry points for `ray job submit` (each module has a `main(config)` and no import-time side effects)."""
