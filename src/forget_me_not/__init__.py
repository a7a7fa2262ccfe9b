"""forget-me-not: make text-to-image diffusion models forget chosen concepts, and measure it."""

__version__ = "0.1.0"
