"""A split of a prepared TFDS data set whose `label` names are characters
(`type="tfds", name="NAME[:VERSION]", split="test"`, `data_dir` optional):
classification figures, as for a folder (`classification`)."""

from __future__ import annotations

from simpsons_jax import errors
from simpsons_jax.data import tfds
from simpsons_jax.evaluators import classification


class TfdsSplit(classification.Classification):
  """Every example of the split whose class is one of the model's characters;
  the keys of the others are listed by class."""

  required = ("name", "split")

  def read(self) -> classification.Read:
    cmap = self.context.cmap
    split = tfds.TfdsSplit(
      tfds.data_set_name(self.spec["name"]),
      self.spec["split"],
      self.spec.get("data_dir", ""),
    )
    builder = split.builder()
    if split.split not in builder.info.splits:
      raise errors.UserError(
        f"The TFDS data set {split.name} has no split {split.split!r}; its "
        f"splits: {', '.join(builder.info.splits)}."
      )
    scan = split.scan(builder, hashes=True)
    known = {k: scan.sha256[k] for c in cmap.names for k in scan.by_class.get(c, [])}
    others = {c: keys for c, keys in scan.by_class.items() if c not in cmap.names}
    return split.examples(builder, scan, known, cmap), others
