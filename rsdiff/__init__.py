"""rsdiff: label-efficient land-cover segmentation from diffusion-model features, on Ray.

Pipeline: ``ingest`` (GeoTIFF/JPG scenes -> WebDataset shards + manifest), ``pretrain``
(DDP DDPM on Ray Train), ``extract`` (frozen multi-level features on Ray Data), ``sweep``
(Ray Tune over timesteps/blocks/head), ``predict`` (georeferenced class maps).
"""

from rsdiff.errors import RsdiffError

__all__ = ["RsdiffError", "__version__"]
__version__ = "0.1.0"
