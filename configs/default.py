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
  # 'folder': the Kaggle layout in data_dir; 'synthetic': the demo;
  # 'tfds:NAME[:VERSION]': a prepared TFDS data set (see simpsons_jax/data).
  config.dataset = "folder"
  config.data_dir = ""  # One sub-folder per character (simpsons_dataset).
  config.tfds_data_dir = ""  # tfds: where it was prepared ('': TFDS's default).
  config.tfds_split = "train"  # tfds: the split to carve train and val from.
  config.min_images = 800  # Keep characters with at least this many images.
  config.image_size = 128  # Images are resized to image_size x image_size.
  config.val_fraction = 0.05  # Stratified share of each character for val.
  config.train_fraction = 1.0  # Seeded share of the training split to use.
  config.cache_dir = ""  # '' caches decoded images in memory; else on disk.
  # A folder (either Kaggle layout) whose images, and their near-copies at any
  # size, this run never trains or validates on (see simpsons_jax/near_copies).
  config.exclude_copies_of = ""
  config.synthetic_images_per_character = 250  # For dataset='synthetic'.
  # Larger images are skipped (and listed) before they are decoded; also in
  # evaluate and predict.
  config.max_image_pixels = 100_000_000

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

  # Model: 'simpsons_cnn' (the notebook's) or 'resnet' (BatchNorm, residual).
  config.model = "simpsons_cnn"
  config.conv_features = (8, 16, 32, 64)  # simpsons_cnn
  config.dense_features = (512, 512, 512, 512)  # simpsons_cnn
  config.stem_features = 32  # resnet: 3x3 stem conv width,
  config.stem_pool = False  # a 2x2 max pool after the stem,
  config.stage_features = (32, 64, 128)  # widths of the stages (each halves the
  config.blocks_per_stage = 1  # resolution but the first), blocks per stage.
  config.dropout_rate = 0.4  # Before each dense layer.
  config.dtype = "float32"  # Compute type: 'bfloat16' on GPU/TPU; params stay fp32.
  # Convolutions on x86 CPUs: 'onednn' (oneDNN's kernels, as TensorFlow's) or
  # 'xla' (XLA:CPU's own). The same function and parameters either way.
  config.cpu_kernels = "onednn"

  # Starting from another run (see simpsons_jax/finetune.py).
  config.init_from = ""  # 'WORKDIR[:best|latest|STEP]': its weights at step 0.
  config.freeze = ()  # Regexes on parameter paths, e.g. ('(?!logits/).*',).
  config.unfreeze_after_epochs = 0.0  # > 0: frozen layers train after this.
  config.lr_multipliers = ()  # ('PATTERN=FACTOR', ...), e.g. ('conv.*=0.1',).

  # Training.
  config.optimizer = "adam"  # 'adam', 'adamw' or 'sgd' (Nesterov momentum 0.9).
  config.learning_rate = 1e-3  # Peak learning rate.
  config.schedule = "constant"  # 'constant' or 'cosine' (after warmup, to 0).
  config.warmup_epochs = 0.0  # Linear warmup from 0 (cosine schedule).
  config.weight_decay = 0.0  # Decoupled (adamw) or L2 (sgd); not on biases/norms.
  config.label_smoothing = 0.0
  config.mix = "none"  # 'none', 'mixup' or 'cutmix' (each image with another).
  config.mix_alpha = 1.0  # The mixing ratio is drawn from Beta(alpha, alpha).
  config.class_weights = "none"  # 'none' or 'balanced' (loss weight n/(K n_c)).
  config.ema_decay = 0.0  # > 0: evaluate and predict with an EMA of the weights.
  config.eval_flip = False  # Average predictions of the image and its mirror.
  config.batch_size = 64  # Global batch, split over all devices.
  config.num_epochs = 70
  config.seed = 0  # Split, shuffling, augmentation, initialisation and dropout.

  # Devices.
  config.require_accelerator = False  # True: fail rather than train on CPU.

  # Evaluation: the validation split every epoch (and every eval_every_steps
  # steps if > 0); extra data sets in config.evals, each a folder in either
  # Kaggle layout scored every `every_epochs` epochs, e.g. in a config file:
  #   config.evals.kaggle_test = ml_collections.ConfigDict(
  #       {"eval_dir": "~/data/kaggle_simpson_testset", "every_epochs": 5})
  config.eval_every_steps = 0
  config.evals = ml_collections.ConfigDict()

  # Logging and checkpoints.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0  # > 0: also save every this many steps.
  # > 0: trace this many steps (after the first, which compiles) for
  # TensorBoard's profile tab (pip install tensorboard-plugin-profile).
  config.profile_steps = 0
  config.checkpoints_to_keep = 3  # The latest few; the best is always kept too.
  # The validation metric that picks the best checkpoint: 'accuracy',
  # 'balanced_accuracy', 'macro_f1' (for unbalanced data) or 'top3_accuracy'.
  config.checkpoint_metric = "accuracy"
  # True: move the workdir's run to archive/ and start anew; the same command
  # run again resumes the new run (it never discards a run it started).
  config.restart = False
  return config
