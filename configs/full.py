"""The notebook's run on the full Kaggle dataset (13 characters at 128 px).

  python main.py --config=configs/full.py --workdir=runs/full \
      --config.data.dir=~/data/simpsons/simpsons_dataset
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The notebook's settings (they are the defaults)."""
  return default.get_config()
