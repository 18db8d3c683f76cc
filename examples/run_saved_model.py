"""Name the character in images with the exported SavedModel: TensorFlow only.

  python examples/run_saved_model.py runs/full/export/1500/saved_model homer.jpg

The serving signature takes the files' bytes and decodes and resizes them
inside, exactly as training does (the same for TF Serving's REST API:
{"instances": [{"b64": "..."}]}).
"""

import sys
from pathlib import Path

import tensorflow as tf
from export_folder import checked_card


def main(saved_model: str, *images: str) -> None:
  checked_card(Path(saved_model).parent)  # The export it belongs to, whole.
  serve = tf.saved_model.load(saved_model).signatures["serving_default"]
  out = serve(image_bytes=tf.stack([tf.io.read_file(p) for p in images]))
  for path, names, probabilities in zip(
    images, out["characters"].numpy(), out["probabilities"].numpy(), strict=True
  ):
    pairs = zip(names, probabilities, strict=True)
    print(path, " ".join(f"{n.decode()}={p:.4f}" for n, p in pairs))


if __name__ == "__main__":
  main(*sys.argv[1:])
