"""Graph rewrites of velora_fx, one module per family (see README.md beside this file)."""
