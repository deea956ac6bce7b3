"""Datasets, transforms, samplers and loaders. Loaders yield uint8 images; the step normalises on the device."""
