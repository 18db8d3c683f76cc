"""The notebook's sanity check: fit a seeded 1% of the training split exactly.

  python main.py --config=configs/overfit.py --workdir=runs/overfit \
      --config.data_dir=~/data/the-simpsons-characters-dataset/simpsons_dataset
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """No dropout, 1% of the data, many epochs."""
  config = default.get_config()
  config.train_fraction = 0.01
  config.dropout_rate = 0.0
  config.batch_size = 16
  config.num_epochs = 60
  config.log_every_steps = 10
  return config
