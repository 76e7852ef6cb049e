"""The patched llama.cpp runtime: how it is built (``build``), bound (``bindings``) and driven."""
