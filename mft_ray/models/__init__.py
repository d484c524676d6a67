"""Built-in models, never downloaded: tiny local Llamas, the arithmetic testbed, and the registry that resolves ``builtin:`` paths."""
