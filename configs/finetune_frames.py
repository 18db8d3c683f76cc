"""Fine-tune a strong Simpsons-MNIST run on the full-size frames.

The ResNet of `strong.py`, trained on Simpsons-MNIST (28 px, 10 characters),
starts `strong_small.py`'s training on the frames (64 px, 6 characters, all
among the 10: the head is mapped by name) with a lower learning rate and
fewer epochs.

  python main.py --config=configs/strong.py --workdir=runs/strong_mnist_pretrain \
      --config.data.dir=../shared/data/simpsons-mnist/train \
      --config.data.min_images=1 --config.data.image_size=28 \
      --config.data.exclude_copies_of=../shared/data/frames/train
  python main.py --config=configs/finetune_frames.py --workdir=runs/finetune_frames \
      --config.data.dir=../shared/data/frames/train \
      --config.finetune.init_from=runs/strong_mnist_pretrain

The start must not have trained on the frames this run validates on:
Simpsons-MNIST holds shrunk copies of most of them, hence exclude_copies_of.
How it works: docs/results.md, "Fine-tuning".
"""

import ml_collections

from configs import strong_small


def get_config() -> ml_collections.ConfigDict:
  """`strong_small.py`, started from another run's weights."""
  config = strong_small.get_config()
  config.finetune.init_from = "runs/strong_mnist_pretrain"  # WORKDIR[:best|latest|STEP]
  config.optim.learning_rate = 0.02
  config.optim.warmup_epochs = 1.0
  config.train.num_epochs = 40
  return config
