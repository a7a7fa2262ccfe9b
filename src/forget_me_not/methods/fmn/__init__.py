"""FMN: Attention Re-steering on the UNet (`train`), configured by `FmnConfig`."""
