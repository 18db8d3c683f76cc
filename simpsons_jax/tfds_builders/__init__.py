"""TFDS builders of this project (`tfds build` takes their folders)."""
