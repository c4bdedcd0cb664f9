"""From an image to nucleus instances: the attention over a whole image with exact tiling and
test-time augmentation (inferer), and the watershed post-processing (postprocess)."""

from . import inferer, postprocess

__all__ = ["inferer", "postprocess"]
