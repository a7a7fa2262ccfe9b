"""RECE: UCE's closed form, then rounds that derive and erase the embedding that still draws."""
