"""Name the character in images with an exported model.jax: jax, numpy, Pillow.

  python examples/run_model_jax.py runs/full/export/1500 homer.jpg bart.png

Nothing from simpsons_jax is imported. The images are decoded by Pillow and
resized by jax.image.resize (bilinear, antialiased, as training resizes with
TensorFlow): within a few pixel levels of what training saw, since the two
JPEG decoders differ slightly.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from export_folder import checked_card
from PIL import Image


def main(folder: str, *images: str) -> None:
  folder = Path(folder)
  card = checked_card(folder)
  model = jax.export.deserialize((folder / "model.jax").read_bytes())
  names = card["characters"]
  size = card["image_size"]
  batch = []
  for path in images:
    pixels = jnp.asarray(np.asarray(Image.open(path).convert("RGB")), jnp.float32)
    resized = jax.image.resize(pixels, (size, size, 3), "linear", antialias=True)
    batch.append(np.clip(np.round(resized), 0, 255).astype(np.uint8))
  probabilities = np.asarray(model.call(np.stack(batch)))
  for path, p in zip(images, probabilities, strict=True):
    top = np.argsort(-p)[:3]
    print(path, " ".join(f"{names[i]}={p[i]:.4f}" for i in top))


if __name__ == "__main__":
  main(*sys.argv[1:])
