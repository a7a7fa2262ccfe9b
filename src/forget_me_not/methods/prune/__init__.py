"""Skilled-neuron pruning: the UNet units that only the concept drives, switched off."""
