"""A run that needs no download: procedural cartoon characters, 64 px, CPU.

  python main.py --config=configs/demo.py --workdir=runs/demo

The images are generated once into <workdir>/synthetic_data.

Measured (docs/results/demo.json, rendered): 95.3% validation accuracy, macro-F1
0.954, on 150 validation images of synthetic, in 0 min 39 s end to end on
Intel(R) Xeon(R) Processor (avx2, avx512, amx), 2 cores (median of seeds 0).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Six synthetic characters of 250 images each, trained for a few minutes."""
  config = default.get_config()
  config.data.source = "synthetic"
  config.data.min_images = 100
  config.data.image_size = 64
  config.data.val_fraction = 0.1
  config.model.simpsons_cnn.dropout_rate = 0.2
  config.train.batch_size = 32
  config.train.num_epochs = 25
  config.train.log_every_steps = 20
  return config
