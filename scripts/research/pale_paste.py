"""Can pasted pale nuclei teach the self-trained student the pale nuclei its teacher misses? (issue 29)

The nuclei the shipped model misses on the validation images are pale (docs/self_training.md), and
the pseudo-instances never show them, because the teacher misses them too. This transform pastes
copies of a crop's own confident pseudo-instances blended into the crop at a random opacity, so that
the student sees faint nuclei of the right shape labelled as nuclei. ``pale_paste.json`` inserts it
after the crop of ``selftrain.json``'s augmentation:

    EXTRA_CONFIG=scripts/research/pale_paste.json TUNE=false RUNS=bundle/runs/pale_paste \\
        scripts/research/self_training_study.sh ../shared/data/monuseg

docs/self_training.md has the figures (it does not help).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

from scripts.research.distance_student import beside, placement

_CROSS = ndimage.generate_binary_structure(2, 1)


class RandPastePaleNucleid(RandomizableTransform, MapTransform):
    """Paste ``number`` copies of the crop's own pseudo-instances, each rotated by a multiple of 90
    degrees and blended over the crop at an opacity drawn from ``opacity`` (1: an exact copy; low: a pale
    nucleus with the crop's texture showing through). With probability ``touching`` a copy is placed
    against a nucleus of the crop (0.8-1.05 times their summed radii apart), else anywhere.

    ``keys``: the image (``(3, H, W)`` RGB in [0, 1]) and the pseudo-instance target (``(2, H, W)``:
    foreground with gaps carved between touching instances, weight), as ``selftrain.json`` makes them.
    A pasted copy is foreground with weight 1; a 1-px gap is carved where it lies against an instance.
    """

    def __init__(self, keys: KeysCollection, number: int = 8, opacity: Sequence[float] = (0.3, 1.0), touching: float = 0.5,
                 prob: float = 1.0):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name the image and the target, got {keys!r}.")
        low, high = (float(v) for v in opacity)
        if not 0 < low <= high <= 1:
            raise ValueError(f"opacity must be (low, high) with 0 < low <= high <= 1, got {opacity!r}.")
        self.number, self.opacity, self.touching = int(number), (low, high), float(touching)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image_key, target_key = self.keys
        image, target = d[image_key], d[target_key]
        x = np.array(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
        y = np.array(target.detach().cpu() if isinstance(target, torch.Tensor) else target, dtype=np.float32)
        instances = ndimage.label(y[0] > 0)[0]
        bank = [(x[(slice(None), *box)].copy(), instances[box] == k) for k, box in enumerate(ndimage.find_objects(instances), 1)
                if box is not None]
        for _ in range(self.number if bank else 0):
            self._paste_one(x, y, instances, bank)
        d[image_key] = torch.as_tensor(x) if isinstance(image, torch.Tensor) else x
        d[target_key] = torch.as_tensor(y) if isinstance(target, torch.Tensor) else y
        return d

    def _paste_one(self, x: np.ndarray, y: np.ndarray, instances: np.ndarray, bank: list) -> None:
        pixels, mask = bank[self.R.randint(len(bank))]
        k = self.R.randint(4)
        pixels, mask = np.rot90(pixels, k, (1, 2)), np.rot90(mask, k)
        ids = np.unique(instances[instances > 0])
        if len(ids) and self.R.rand() < self.touching:
            centre = beside(instances == self.R.choice(ids), mask, self.R.uniform(0.8, 1.05), self.R.uniform(0, 2 * np.pi))
        else:
            centre = self.R.uniform(0, 1, 2) * instances.shape
        where = placement(instances.shape, mask.shape, centre)
        if where is None:
            return
        crop, patch = where
        placed = np.zeros(instances.shape, bool)
        placed[crop] = mask[patch]
        source = np.zeros_like(x)
        source[(slice(None), *crop)] = pixels[(slice(None), *patch)]
        alpha = self.R.uniform(*self.opacity)
        x[:, placed] = alpha * source[:, placed] + (1 - alpha) * x[:, placed]
        gap = ndimage.binary_dilation(placed, _CROSS) & ~placed & (instances > 0)
        y[0][gap], y[1][gap] = 0, 1
        y[0][placed], y[1][placed] = 1, 1
        instances[placed] = instances.max() + 1
        instances[gap] = 0
