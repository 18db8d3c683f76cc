"""The notebook's sanity check: fit a seeded 1% of the training split exactly.

  python main.py --config=configs/overfit.py --workdir=runs/overfit \
      --config.data.dir=~/data/simpsons/simpsons_dataset
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """No dropout, 1% of the data, many epochs."""
  config = default.get_config()
  config.data.train_fraction = 0.01
  config.model.simpsons_cnn.dropout_rate = 0.0
  config.train.batch_size = 16
  config.train.num_epochs = 60
  config.train.log_every_steps = 10
  return config
