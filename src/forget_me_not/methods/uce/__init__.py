"""UCE (Unified Concept Editing, Gandikota et al. 2024): a closed-form edit of every
cross-attention to_k and to_v."""
