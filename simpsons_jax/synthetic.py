"""A procedural demo dataset of cartoon characters, in the Kaggle layout.

Six characters, told apart by the shape of head and hair as well as by colour,
drawn at random position and scale on random backgrounds with clutter, in
images of random size. It needs no download and is the same for the same seed.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from simpsons_jax import files

YELLOW = (255, 217, 15)
CHARACTERS = (
  "bald_dad",
  "big_blue_hair",
  "clown",
  "old_boss",
  "spiky_kid",
  "star_girl",
)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 25):
  return tuple(
    int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour
  )


def _eyes(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
  for dx in (-0.35, 0.35):
    ex, ey, er = cx + dx * r, cy - 0.1 * r, 0.22 * r
    draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill="white", outline="black")
    draw.ellipse([ex - er / 3, ey - er / 3, ex + er / 3, ey + er / 3], fill="black")


def _spikes(cx, cy, r, n, inner, outer, start, stop):
  """Points of a zig-zag crown between angles `start` and `stop` (radians)."""
  points = []
  for i in range(2 * n + 1):
    angle = start + (stop - start) * i / (2 * n)
    radius = outer if i % 2 else inner
    points.append((cx + radius * r * np.cos(angle), cy - radius * r * np.sin(angle)))
  return points


def _draw_character(draw, name, cx, cy, r, rng) -> None:
  """Draws one character with its head of radius `r` centred at (cx, cy)."""
  skin = _jitter(rng, YELLOW)
  head = [cx - r, cy - r, cx + r, cy + r]
  body = [cx - 0.8 * r, cy + 0.9 * r, cx + 0.8 * r, cy + 2.2 * r]
  if name == "bald_dad":
    draw.rectangle(body, fill=_jitter(rng, (240, 240, 240)))
    draw.ellipse(head, fill=skin)
    draw.ellipse(
      [cx - 0.7 * r, cy + 0.2 * r, cx + 0.7 * r, cy + r], fill=(140, 110, 70)
    )
    for dx in (-0.15, 0.15):
      draw.arc(
        [cx + dx * r - 0.3 * r, cy - 1.3 * r, cx + dx * r + 0.3 * r, cy - 0.7 * r],
        180,
        360,
        fill="black",
        width=max(1, int(r / 12)),
      )
  elif name == "big_blue_hair":
    draw.rectangle(body, fill=_jitter(rng, (120, 200, 60)))
    draw.ellipse(
      [cx - 0.75 * r, cy - 3.2 * r, cx + 0.75 * r, cy - 0.2 * r],
      fill=_jitter(rng, (40, 80, 220)),
    )
    draw.ellipse(head, fill=skin)
  elif name == "clown":
    draw.rectangle(body, fill=_jitter(rng, (150, 60, 170)))
    draw.ellipse(head, fill=_jitter(rng, (245, 245, 245), 10))
    hair = _jitter(rng, (60, 170, 60))
    for side in (-1, 1):
      hx = cx + side * 0.95 * r
      draw.ellipse([hx - 0.45 * r, cy - 0.9 * r, hx + 0.45 * r, cy], fill=hair)
    draw.ellipse(
      [cx - 0.2 * r, cy + 0.05 * r, cx + 0.2 * r, cy + 0.45 * r], fill=(220, 20, 20)
    )
  elif name == "old_boss":
    draw.rectangle(body, fill=_jitter(rng, (60, 60, 70)))
    draw.rounded_rectangle(
      [cx - 0.7 * r, cy - 1.1 * r, cx + 0.7 * r, cy + r],
      radius=0.3 * r,
      fill=_jitter(rng, (235, 225, 170)),
    )
    draw.polygon(
      [(cx, cy - 0.1 * r), (cx + 0.5 * r, cy + 0.35 * r), (cx, cy + 0.4 * r)],
      fill=_jitter(rng, (220, 200, 140)),
    )
  elif name == "spiky_kid":
    draw.rectangle(body, fill=_jitter(rng, (240, 110, 20)))
    draw.polygon(_spikes(cx, cy, r, 5, 0.6, 1.6, np.pi * 0.05, np.pi * 0.95), fill=skin)
    draw.rectangle([cx - r, cy - 0.3 * r, cx + r, cy + r], fill=skin)
  elif name == "star_girl":
    draw.polygon(
      [(cx - 0.8 * r, cy + 2.2 * r), (cx + 0.8 * r, cy + 2.2 * r), (cx, cy + 0.8 * r)],
      fill=_jitter(rng, (230, 50, 40)),
    )
    draw.polygon(_spikes(cx, cy, r, 8, 0.8, 1.7, 0, 2 * np.pi), fill=skin)
    draw.ellipse(head, fill=skin)
  else:
    raise ValueError(f"Unknown synthetic character {name!r}.")
  _eyes(draw, cx, cy, r)


def render(name: str, rng: np.random.Generator) -> Image.Image:
  """One frame of character `name` on a random cluttered background."""
  width, height = (int(v) for v in rng.integers(96, 224, size=2))
  image = Image.new(
    "RGB", (width, height), _jitter(rng, tuple(rng.integers(0, 256, 3)), 0)
  )
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(2, 7))):
    x0, y0 = rng.uniform(-0.2, 1.0, 2) * (width, height)
    w, h = rng.uniform(0.1, 0.5, 2) * (width, height)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
    shape([x0, y0, x0 + w, y0 + h], fill=colour)
  side = min(width, height)
  r = rng.uniform(0.12, 0.22) * side
  cx = rng.uniform(0.3, 0.7) * width
  cy = rng.uniform(0.35, 0.55) * height
  _draw_character(draw, name, cx, cy, r, rng)
  return image


def generate(
  root: str | os.PathLike, images_per_character: int, seed: int = 0
) -> epath.Path:
  """Writes `root/<character>/pic_NNNN.jpg` unless it is already there.

  On a local disk the images are drawn into a temporary folder renamed at the
  end, so that a process sharing the workdir, or a run killed halfway, never
  sees half of it. Object stores (`gs://`) cannot rename a folder at once:
  there `root/.complete`, written last, says the folder is whole.
  """
  root = files.as_path(root)
  if files.is_local(root):
    if root.exists():
      return root
    partial = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    if partial.exists():
      partial.rmtree()
    _draw(partial, images_per_character, seed)
    try:
      partial.rename(root)
    except OSError:  # Another process of the run finished first.
      partial.rmtree()
    return root
  complete = root / ".complete"
  if not complete.exists():
    _draw(root, images_per_character, seed)
    complete.write_text("")
  return root


def _draw(root: epath.Path, images_per_character: int, seed: int) -> None:
  for label, name in enumerate(CHARACTERS):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, label])
    for i in range(images_per_character):
      with (folder / f"pic_{i:04d}.jpg").open("wb") as f:
        render(name, rng).save(f, format="JPEG", quality=90)
