"""Every knob of simpsons_jax, documented once; other configs override a few.

The notebook's settings: 128x128 RGB, characters with at least 800 pictures,
a 95/5 split, Adam at 1e-3, dropout 0.4.

  python main.py --config=configs/default.py --workdir=runs/default \
      --config.data.dir=~/data/simpsons/simpsons_dataset
"""

import ml_collections

from simpsons_jax import models


def get_config() -> ml_collections.ConfigDict:
  """The default configuration: its top-level keys here, each group (data,
  augment, model, optim, train, finetune, evals, ckpt) from its function."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Split, shuffling, augmentation, initialisation and dropout.
  # True: move the workdir's run to archive/ and start anew; the same command
  # run again resumes the new run (it never discards a run it started).
  config.restart = False
  # Average the predictions of each image and its mirror (evaluation, predict,
  # export, serve, video).
  config.test_time_flip = False
  config.data = _data()
  config.augment = _augment()
  config.model = _model()
  config.optim = _optim()
  config.train = _train()
  config.finetune = _finetune()
  config.evals = _evals()
  config.ckpt = _ckpt()
  return config


def _data() -> ml_collections.ConfigDict:
  """`config.data`: where the images come from, which characters, the split."""
  group = ml_collections.ConfigDict()
  # 'folder': the Kaggle layout in data.dir; 'synthetic': the demo;
  # 'tfds:NAME[:VERSION]': a prepared TFDS data set (see simpsons_jax/data).
  group.source = "folder"
  group.dir = ""  # One sub-folder per character (simpsons_dataset).
  group.tfds_dir = ""  # tfds: where it was prepared ('': TFDS's default).
  group.tfds_split = "train"  # tfds: the split to carve train and val from.
  group.min_images = 800  # Keep characters with at least this many images.
  # Characters left out of training and validation, e.g. to measure how well
  # the model answers 'unknown' (evaluate --unknown_dir=<the data folder>).
  group.hold_out = ()
  # Images of characters the model must answer 'unknown' for ("known
  # unknowns"): '' (none), 'below_min_images' (every folder with fewer than
  # min_images pictures: on the Kaggle data, the 29 characters the notebook
  # drops) or folder names, 'a,b'. They train towards "none of these" (the
  # uniform answer, weighted by train.negatives_weight) and their validation
  # share chooses the unknown score and threshold (simpsons_jax/open_set.py).
  group.negatives = ""
  # The share of the negative characters that never train and validate whole
  # (at least one, never all; 0: each splits by val_fraction like the
  # characters): the unknown score is chosen on characters the run did not
  # train on, as it will meet them (docs/results.md).
  group.negatives_val_share = 0.5
  # The share of images of characters it does not know that the model is
  # expected to meet: the validation negatives count as this share when the
  # run sets its 95%-precision 'unknown' threshold (simpsons_jax/open_set.py).
  group.unknown_share = 0.2
  group.image_size = 128  # Images are resized to image_size x image_size.
  group.val_fraction = 0.05  # Stratified share of each character for val.
  group.train_fraction = 1.0  # Seeded share of the training split to use.
  group.cache_dir = ""  # '' caches decoded images in memory; else on disk.
  # A folder (either Kaggle layout) whose images, and their near-copies at any
  # size, this run never trains or validates on (see simpsons_jax/data/near_copies.py).
  group.exclude_copies_of = ""
  group.synthetic_per_character = 250  # For source='synthetic'.
  # Larger images are skipped (and listed) before they are decoded; also in
  # evaluate and predict.
  group.max_image_pixels = 100_000_000
  return group


def _augment() -> ml_collections.ConfigDict:
  """`config.augment`: the augmentation of training batches."""
  # Augmentation of training batches (after the cache; seeded). All off: the
  # notebook's run. Crop, shift, rotation and flip are one affine warp.
  group = ml_collections.ConfigDict()
  group.flip = False  # Mirror left-right with probability 1/2.
  group.crop_min_area = 1.0  # Random resized crop of [this, 1] of the area.
  group.shift = 0.0  # Random shift, up to this fraction of the size.
  group.rotation_degrees = 0.0  # Random rotation in [-this, this].
  group.brightness = 0.0  # Colour jitter: +-this of the range,
  group.contrast = 0.0  # contrast and saturation factors in
  group.saturation = 0.0  # [1 - this, 1 + this].
  return group


def _model() -> ml_collections.ConfigDict:
  """`config.model`: the network and its settings."""
  # The network: model.name picks one of simpsons_jax/models.py's MODELS;
  # model.<name> holds its settings (the fields of its class, with their
  # defaults and meaning there), e.g. --config.model.name=resnet
  # --config.model.resnet.stage_features=64,128. The notebook's network:
  group = models.settings("simpsons_cnn")
  group.simpsons_cnn.dropout_rate = 0.4
  return group


def _optim() -> ml_collections.ConfigDict:
  """`config.optim`: the optimizer, its schedule and the EMA of the weights."""
  group = ml_collections.ConfigDict()
  group.name = "adam"  # 'adam', 'adamw' or 'sgd' (Nesterov momentum 0.9).
  group.learning_rate = 1e-3  # Peak learning rate.
  group.schedule = "constant"  # 'constant' or 'cosine' (after warmup, to 0).
  group.warmup_epochs = 0.0  # Linear warmup from 0 (cosine schedule).
  group.weight_decay = 0.0  # Decoupled (adamw) or L2 (sgd); not on norms.
  group.ema_decay = 0.0  # > 0: evaluate and predict with an EMA of weights.
  return group


def _train() -> ml_collections.ConfigDict:
  """`config.train`: the training loop: batch, epochs, loss, compute, logging."""
  group = ml_collections.ConfigDict()
  group.batch_size = 64  # Global batch, split over all devices.
  group.num_epochs = 70
  group.label_smoothing = 0.0
  group.mix = "none"  # 'none', 'mixup' or 'cutmix' (each image with another).
  group.mix_alpha = 1.0  # The mixing ratio is drawn from Beta(alpha, alpha).
  group.class_weights = "none"  # 'none' or 'balanced' (weight n/(K n_c)).
  # The weight of the negatives' term (data.negatives): cross-entropy with the
  # uniform distribution, as outlier exposure (Hendrycks et al. 2019).
  group.negatives_weight = 2.0
  # Compute: 'bfloat16' on GPU/TPU and on x86 CPUs with bfloat16 dot products
  # (AVX512_BF16, AMX; float32 elsewhere, said in the log); params stay fp32.
  group.dtype = "float32"
  # Convolutions on x86 CPUs: 'onednn' (oneDNN's kernels, as TensorFlow's) or
  # 'xla' (XLA:CPU's own). The same function and parameters either way.
  group.cpu_kernels = "onednn"
  group.require_accelerator = False  # True: fail rather than train on CPU.
  group.log_every_steps = 50
  # The validation split is scored every epoch, and every this many steps if > 0.
  group.eval_every_steps = 0
  # > 0: trace this many steps (after the first, which compiles) for
  # TensorBoard's profile tab (pip install tensorboard-plugin-profile).
  group.profile_steps = 0
  return group


def _finetune() -> ml_collections.ConfigDict:
  """`config.finetune`: starting from another run's weights, frozen or slowed layers."""
  # Starting from another run (see simpsons_jax/finetune.py).
  group = ml_collections.ConfigDict()
  group.init_from = ""  # 'WORKDIR[:best|latest|STEP]': weights at step 0.
  group.freeze = ()  # Regexes on parameter paths, e.g. ('(?!logits/).*',).
  group.unfreeze_after_epochs = 0.0  # > 0: frozen layers train after.
  group.lr_multipliers = ()  # ('PATTERN=FACTOR', ...): ('conv.*=0.1',).
  return group


def _evals() -> ml_collections.ConfigDict:
  """`config.evals`: more evaluations during training, by type."""
  # Evaluations run every `every_epochs` epochs, each by its `type`: one of
  # simpsons_jax/evaluators' EVALUATORS (validation, folder, tfds,
  # calibration, unknowns) or a class of yours as 'module:Class'
  # (docs/extending.md), e.g. in a config file:
  #   config.evals.kaggle_test = dict(
  #       type="folder", dir="~/data/kaggle_simpson_testset", every_epochs=5)
  #   config.evals.others = dict(type="unknowns", dir="~/data/others")
  group = ml_collections.ConfigDict()
  return group


def _ckpt() -> ml_collections.ConfigDict:
  """`config.ckpt`: which checkpoints are kept, and how the best is chosen."""
  group = ml_collections.ConfigDict()
  group.every_steps = 0  # > 0: also save every this many steps.
  group.keep = 3  # The latest few; the best is always kept too.
  # The validation metric that picks the best checkpoint: 'accuracy',
  # 'balanced_accuracy', 'macro_f1' (for unbalanced data) or 'top3_accuracy'.
  group.metric = "accuracy"
  return group
