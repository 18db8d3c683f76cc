"""Every knob of simpsons_jax, documented once; other configs override a few.

The notebook's settings: 128x128 RGB, characters with at least 800 pictures,
a 95/5 split, Adam at 1e-3, dropout 0.4.

  python main.py --config=configs/default.py --workdir=runs/default \
      --config.data_dir=~/data/simpsons_dataset
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default configuration."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = "folder"  # 'folder': Kaggle layout in data_dir; 'synthetic'.
  config.data_dir = ""  # One sub-folder per character (simpsons_dataset).
  config.min_images = 800  # Keep characters with at least this many images.
  config.image_size = 128  # Images are resized to image_size x image_size.
  config.val_fraction = 0.05  # Stratified share of each character for val.
  config.train_fraction = 1.0  # Seeded share of the training split to use.
  config.cache_dir = ""  # '' caches decoded images in memory; else on disk.
  config.synthetic_images_per_character = 250  # For dataset='synthetic'.

  # Model.
  config.model = "simpsons_cnn"
  config.conv_features = (8, 16, 32, 64)
  config.dense_features = (512, 512, 512, 512)
  config.dropout_rate = 0.4
  config.dtype = "float32"  # Compute type: 'bfloat16' on GPU/TPU; params stay fp32.

  # Training.
  config.learning_rate = 1e-3  # Adam.
  config.batch_size = 64  # Global batch, split over all devices.
  config.num_epochs = 70
  config.seed = 0  # Split, shuffling, initialisation and dropout.

  # Devices.
  config.require_accelerator = False  # True: fail rather than train on CPU.

  # Logging and checkpoints.
  config.log_every_steps = 50
  config.checkpoints_to_keep = 3  # The latest few; the best is always kept too.
  config.restart = False  # True: move the workdir's run to archive/, start anew.
  return config
