"""Value-space erasure: the concept's directions projected out of every cross-attention value."""
