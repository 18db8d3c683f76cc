"""The Simpsons Characters Data (Kaggle) as a TFDS dataset.

  tfds build simpsons_jax/tfds_builders/simpsons_characters \
      --manual_dir=~/data/the-simpsons-characters-dataset \
      --data_dir=~/tensorflow_datasets

`manual_dir` is the unpacked Kaggle archive (or any folder of `<character>/`
image folders). Every character folder becomes a class (sorted names); its
images, checked as training checks them (`image_files`), form the `train`
split, and `kaggle_simpson_testset/<character>_<N>.jpg`, when present, the
`test` split (its images of characters without a folder are left out). The
JPEG and PNG bytes are stored as they are. Then train with
`--config.data.source=tfds:simpsons_characters`.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from simpsons_jax import characters, image_files

_TEST_FOLDER = "kaggle_simpson_testset"


class Builder(tfds.core.GeneratorBasedBuilder):
  """Frames of The Simpsons labelled with the character shown."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download "The Simpsons Characters Data" from Kaggle
  (alexattia/the-simpsons-characters-dataset), unpack it, and pass the folder
  as --manual_dir (any folder of <character>/ image folders works too).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          # Names come from the folders, in _split_generators.
          "label": tfds.features.ClassLabel(),
          "file_name": tfds.features.Text(),
        }
      ),
      description=__doc__.split("\n\n")[0],
      supervised_keys=("image", "label"),
      homepage="https://www.kaggle.com/datasets/alexattia/the-simpsons-characters-dataset",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = characters.resolve_data_dir(dl_manager.manual_dir)
    found = characters.find_images(root)
    self.info.features["label"].names = sorted(found)
    splits = {"train": self._generate_examples(found)}
    test = Path(dl_manager.manual_dir) / _TEST_FOLDER
    for candidate in (test / _TEST_FOLDER, test):
      if candidate.is_dir():
        labelled = characters.find_labelled_images(candidate)
        splits["test"] = self._generate_examples(
          {name: paths for name, paths in labelled.items() if name in found}
        )
        break
    return splits

  def _generate_examples(self, images: dict[str, list[Path]]):
    usable = image_files.keep_usable(images, None).images
    for name, paths in usable.items():
      for path in paths:
        key = f"{name}/{path.name}"
        yield key, {"image": path, "label": name, "file_name": key}
