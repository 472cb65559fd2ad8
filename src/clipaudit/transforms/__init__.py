"""The image transforms of Transformative Caption Analysis (TCAC), seeded and reproducible.

Seven transforms, as in the paper's Figure 4: ``grayscale``, ``rotation`` (random rotation), ``affine`` (random
affine), ``hflip``, ``invert`` (random inversion), ``perspective`` (random perspective) and ``elastic``, each
parametrised by the ``tcac.params.<name>`` section of the config (:mod:`~clipaudit.transforms.params`). Beside
them, five graded corruptions at five severity levels each, as ImageNet-C grades them (``jpeg@1`` ...
``brightness@5``; :mod:`~clipaudit.transforms.severities`).

For every (seed, image_id, transform) the random parameters are drawn from a generator seeded by a stable hash
(:mod:`~clipaudit.transforms.draw`) and recorded as JSON; they alone determine the output (the elastic field and
the noise are drawn from recorded seeds), so a re-run gives the same pixels. They are applied by batched tensor
kernels on the device the pixels are on (:mod:`~clipaudit.transforms.kernels`, through
:func:`~clipaudit.transforms.apply.transform_batch`).

TCAC draws and applies them at the CLIP model's input resolution: on the image resized as the model's
preprocessing resizes it, before its centre crop (see :mod:`clipaudit.model_view`). Pixel-valued parameters
(``translate``, the perspective corners, the elastic ``alpha`` and ``sigma``, the blur's sigma) are therefore
pixels of that image.

Nothing here imports torch at module import (the config imports this package).
"""

from clipaudit.transforms.apply import (
    apply_params,
    input_from,
    recreate_transformed,
    transform_batch,
    transform_image,
    transform_params_from,
)
from clipaudit.transforms.draw import generator_for, params_json, sample_params, seed_for
from clipaudit.transforms.kernels import TransformFailed
from clipaudit.transforms.params import (
    TRANSFORM_NAMES,
    AffineParams,
    ElasticParams,
    GrayscaleParams,
    HflipParams,
    InvertParams,
    PerspectiveParams,
    ProbabilityParams,
    RotationParams,
    TransformName,
    TransformParams,
)
from clipaudit.transforms.severities import CORRUPTION_NAMES, LEVELS, expand, is_graded, parse_graded

__all__ = [
    "CORRUPTION_NAMES", "LEVELS", "TRANSFORM_NAMES", "AffineParams", "ElasticParams", "GrayscaleParams",
    "HflipParams", "InvertParams", "PerspectiveParams", "ProbabilityParams", "RotationParams", "TransformFailed",
    "TransformName", "TransformParams", "apply_params", "expand", "generator_for", "input_from", "is_graded",
    "params_json", "parse_graded", "recreate_transformed", "sample_params", "seed_for", "transform_batch",
    "transform_image", "transform_params_from",
]
