"""Model definitions: the Flax CLIP port with prompt slots."""
