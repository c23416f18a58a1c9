"""KV cache tiers below the engine's own pool (G1): host memory (G2, private or shared by the
workers of one node) and local disk (G3). ``KvTiers`` offloads blocks into them and onboards
them back on a prefix hit."""
