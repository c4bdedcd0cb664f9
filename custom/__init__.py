"""Self-supervised nuclei segmentation with attention (Sahasrabudhe et al., MICCAI 2020).

Modules
-------
config      boolean settings as they arrive from the command line
networks    attention network F, percentile sigmoid, the F+G scale model
losses      scale, smoothness and equivariance losses
transforms  dihedral group, Reinhard colour transfer, HED jitter (array + dict pairs)
data        prepared-layout reading, multi-magnification datasets, balanced batch sampler
monuseg     MoNuSeg download and XML-to-label conversion
engine      the training iteration run by MONAI's SupervisedTrainer
handlers    Ignite handlers: TensorBoard attention maps, model export
inference   whole-image attention inference: exact tiling, test-time augmentation
postprocess attention map -> nucleus instances (the paper's watershed), transform + handler
metrics     AJI, AHD, ADC (the authors' definitions), AJI+, PQ, F1 as MONAI/Ignite metrics
"""

# config expressions ("$custom.data.list_ids(...)") need the submodules loaded by `import custom`
from custom import config, data, engine, handlers, inference, losses, metrics, monuseg, networks, postprocess, transforms  # noqa: F401
