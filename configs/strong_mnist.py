"""`strong.py` for Simpsons-MNIST (28 px): a schedule that fills 15 minutes.

75 epochs of cosine decay instead of 30, with stronger augmentation to go
with them (crops down to 60% of the area, rotations up to 10 degrees, colour
jitter of 0.2), sized for two CPU cores (`python benchmarks/speed.py
--model=resnet` prints this machine's rate).

  python main.py --config=configs/strong_mnist.py --workdir=runs/strong_mnist \
      --config.data.dir=~/data/simpsons-mnist/dataset/rgb/train

Measured (docs/results/strong_mnist.json, rendered): 93.2% validation accuracy,
macro-F1 0.932, on 400 validation images of ../shared/data/simpsons-mnist/train,
in 12 min 40 s end to end on Intel(R) Xeon(R) Processor (avx2, avx512, amx), 2
cores (median of seeds 0).
"""

import ml_collections

from configs import strong


def get_config() -> ml_collections.ConfigDict:
  """The strong configuration at 28 px, for 15 minutes of a 2-core CPU."""
  config = strong.get_config()
  config.data.image_size = 28
  config.data.min_images = 1  # Simpsons-MNIST has 800 images of each of its 10.
  config.train.num_epochs = 75

  config.augment.crop_min_area = 0.6
  config.augment.rotation_degrees = 10.0
  config.augment.brightness = 0.2
  config.augment.contrast = 0.2
  config.augment.saturation = 0.2
  return config
