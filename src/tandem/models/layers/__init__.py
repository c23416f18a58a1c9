"""The building blocks of a decoder: paged attention over the KV cache, linear layers with their CPU fast paths, RoPE."""
