"""ESD (Erasing Concepts from Diffusion Models, Gandikota et al. 2023): fine-tune the UNet so
the concept's prediction follows negative guidance away from it."""
