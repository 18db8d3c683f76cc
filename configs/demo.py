"""A run that needs no download: procedural cartoon characters, 64 px, CPU.

  python main.py --config=configs/demo.py --workdir=runs/demo

The images are generated once into <workdir>/synthetic_data.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Six synthetic characters of 250 images each, trained for a few minutes."""
  config = default.get_config()
  config.dataset = "synthetic"
  config.min_images = 100
  config.image_size = 64
  config.val_fraction = 0.1
  config.dropout_rate = 0.2
  config.batch_size = 32
  config.num_epochs = 25
  config.log_every_steps = 20
  return config
