"""Name the character in images with the exported model.tflite: TensorFlow Lite.

  python examples/run_tflite.py runs/full/export/1500 homer.jpg

The images are decoded and resized with TensorFlow as training does (on a
device, any decoder and a bilinear, antialiased resize to the model's size).
"""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from export_folder import checked_card


def main(folder: str, *images: str) -> None:
  folder = Path(folder)
  card = checked_card(folder)
  names, size = card["characters"], card["image_size"]
  run = tf.lite.Interpreter(str(folder / "model.tflite")).get_signature_runner()
  batch = []
  for path in images:
    image = tf.io.decode_image(
      tf.io.read_file(path), channels=3, expand_animations=False
    )
    resized = tf.image.resize(image, (size, size), antialias=True)
    batch.append(tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8))
  (probabilities,) = run(images=np.stack(batch)).values()
  for path, p in zip(images, probabilities, strict=True):
    top = np.argsort(-p)[:3]
    print(path, " ".join(f"{names[i]}={p[i]:.4f}" for i in top))


if __name__ == "__main__":
  main(*sys.argv[1:])
