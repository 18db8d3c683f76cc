"""The strong configuration for a data set of a few hundred images.

A larger validation share, small batches, stronger crops and rotations, many
more epochs, a faster EMA, class-balanced loss weights, and the best checkpoint
chosen by macro-F1, which every character counts in alike. Fine-tuning from a
Simpsons-MNIST run may do better: configs/finetune_frames.py.

  python main.py --config=configs/strong_small.py --workdir=runs/strong_frames \
      --config.data.dir=../shared/data/frames/train

Measured (docs/results/strong_small_frames.json, rendered): 87.6% validation
accuracy, macro-F1 0.799, on 121 validation images of
../shared/data/frames/train, in 5 min 59 s end to end on Intel(R) Xeon(R)
Processor (avx2, avx512, amx), 2 cores (median of seeds 0).
"""

import ml_collections

from configs import strong


def get_config() -> ml_collections.ConfigDict:
  """`strong.py` for a few hundred images (64 px)."""
  config = strong.get_config()
  config.data.min_images = 1
  config.data.val_fraction = 0.2
  config.train.class_weights = "balanced"
  config.ckpt.metric = "macro_f1"

  config.augment.crop_min_area = 0.35
  config.augment.rotation_degrees = 15.0

  config.train.batch_size = 32
  config.optim.learning_rate = 0.05
  config.optim.warmup_epochs = 3.0
  config.optim.ema_decay = 0.99
  config.train.num_epochs = 100
  return config
