""" Add BAM or CBAM to a CNN you already have (timm or torchvision), in place: `insert_bam`, `insert_cbam`
(`insertion.py`), and the timm model `with_attention` that Hub folders name (`inserted.py`). """
from .insertion import insert_bam, insert_cbam
# registers `with_attention` with timm, which `bam-models insert` folders name in their config.json
from . import inserted  # noqa: F401

__all__ = ['insert_bam', 'insert_cbam']
