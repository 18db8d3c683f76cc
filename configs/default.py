"""Every knob of simpsons_jax, documented once; other configs override a few.

The notebook's settings: 128x128 RGB, characters with at least 800 pictures,
a 95/5 split, Adam at 1e-3, dropout 0.4.

  python main.py --config=configs/default.py --workdir=runs/default \
      --config.data.dir=~/data/simpsons/simpsons_dataset
"""

import ml_collections

from simpsons_jax import models


def get_config() -> ml_collections.ConfigDict:
  """The default configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Split, shuffling, augmentation, initialisation and dropout.
  # True: move the workdir's run to archive/ and start anew; the same command
  # run again resumes the new run (it never discards a run it started).
  config.restart = False
  # Average the predictions of each image and its mirror (evaluation, predict,
  # export, serve, video).
  config.test_time_flip = False

  config.data = ml_collections.ConfigDict()
  # 'folder': the Kaggle layout in data.dir; 'synthetic': the demo;
  # 'tfds:NAME[:VERSION]': a prepared TFDS data set (see simpsons_jax/data).
  config.data.source = "folder"
  config.data.dir = ""  # One sub-folder per character (simpsons_dataset).
  config.data.tfds_dir = ""  # tfds: where it was prepared ('': TFDS's default).
  config.data.tfds_split = "train"  # tfds: the split to carve train and val from.
  config.data.min_images = 800  # Keep characters with at least this many images.
  # Characters left out of training and validation, e.g. to measure how well
  # the model answers 'unknown' (evaluate --unknown_dir=<the data folder>).
  config.data.hold_out = ()
  config.data.image_size = 128  # Images are resized to image_size x image_size.
  config.data.val_fraction = 0.05  # Stratified share of each character for val.
  config.data.train_fraction = 1.0  # Seeded share of the training split to use.
  config.data.cache_dir = ""  # '' caches decoded images in memory; else on disk.
  # A folder (either Kaggle layout) whose images, and their near-copies at any
  # size, this run never trains or validates on (see simpsons_jax/near_copies).
  config.data.exclude_copies_of = ""
  config.data.synthetic_per_character = 250  # For source='synthetic'.
  # Larger images are skipped (and listed) before they are decoded; also in
  # evaluate and predict.
  config.data.max_image_pixels = 100_000_000

  # Augmentation of training batches (after the cache; seeded). All off: the
  # notebook's run. Crop, shift, rotation and flip are one affine warp.
  config.augment = ml_collections.ConfigDict()
  config.augment.flip = False  # Mirror left-right with probability 1/2.
  config.augment.crop_min_area = 1.0  # Random resized crop of [this, 1] of the area.
  config.augment.shift = 0.0  # Random shift, up to this fraction of the size.
  config.augment.rotation_degrees = 0.0  # Random rotation in [-this, this].
  config.augment.brightness = 0.0  # Colour jitter: +-this of the range,
  config.augment.contrast = 0.0  # contrast and saturation factors in
  config.augment.saturation = 0.0  # [1 - this, 1 + this].

  # The network: model.name picks one of simpsons_jax/models.py's MODELS;
  # model.<name> holds its settings (the fields of its class, with their
  # defaults and meaning there), e.g. --config.model.name=resnet
  # --config.model.resnet.stage_features=64,128. The notebook's network:
  config.model = models.settings("simpsons_cnn")
  config.model.simpsons_cnn.dropout_rate = 0.4

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"  # 'adam', 'adamw' or 'sgd' (Nesterov momentum 0.9).
  config.optim.learning_rate = 1e-3  # Peak learning rate.
  config.optim.schedule = "constant"  # 'constant' or 'cosine' (after warmup, to 0).
  config.optim.warmup_epochs = 0.0  # Linear warmup from 0 (cosine schedule).
  config.optim.weight_decay = 0.0  # Decoupled (adamw) or L2 (sgd); not on norms.
  config.optim.ema_decay = 0.0  # > 0: evaluate and predict with an EMA of weights.

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64  # Global batch, split over all devices.
  config.train.num_epochs = 70
  config.train.label_smoothing = 0.0
  config.train.mix = "none"  # 'none', 'mixup' or 'cutmix' (each image with another).
  config.train.mix_alpha = 1.0  # The mixing ratio is drawn from Beta(alpha, alpha).
  config.train.class_weights = "none"  # 'none' or 'balanced' (weight n/(K n_c)).
  config.train.dtype = "float32"  # Compute: 'bfloat16' on GPU/TPU; params stay fp32.
  # Convolutions on x86 CPUs: 'onednn' (oneDNN's kernels, as TensorFlow's) or
  # 'xla' (XLA:CPU's own). The same function and parameters either way.
  config.train.cpu_kernels = "onednn"
  config.train.require_accelerator = False  # True: fail rather than train on CPU.
  config.train.log_every_steps = 50
  # The validation split is scored every epoch, and every this many steps if > 0.
  config.train.eval_every_steps = 0
  # > 0: trace this many steps (after the first, which compiles) for
  # TensorBoard's profile tab (pip install tensorboard-plugin-profile).
  config.train.profile_steps = 0

  # Starting from another run (see simpsons_jax/finetune.py).
  config.finetune = ml_collections.ConfigDict()
  config.finetune.init_from = ""  # 'WORKDIR[:best|latest|STEP]': weights at step 0.
  config.finetune.freeze = ()  # Regexes on parameter paths, e.g. ('(?!logits/).*',).
  config.finetune.unfreeze_after_epochs = 0.0  # > 0: frozen layers train after.
  config.finetune.lr_multipliers = ()  # ('PATTERN=FACTOR', ...): ('conv.*=0.1',).

  # More data sets to score during training, each every `every_epochs` epochs,
  # by `type` (simpsons_jax/evaluators.py's EVALUATORS), e.g. in a config file:
  #   config.evals.kaggle_test = dict(
  #       type="folder", dir="~/data/kaggle_simpson_testset", every_epochs=5)
  config.evals = ml_collections.ConfigDict()

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every_steps = 0  # > 0: also save every this many steps.
  config.ckpt.keep = 3  # The latest few; the best is always kept too.
  # The validation metric that picks the best checkpoint: 'accuracy',
  # 'balanced_accuracy', 'macro_f1' (for unbalanced data) or 'top3_accuracy'.
  config.ckpt.metric = "accuracy"
  return config
