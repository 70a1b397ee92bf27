""" The import path `bam_models.detection` that users already write; the builders live in
`bam_models.tasks.detection`. """
from bam_models.tasks.detection import *  # noqa: F401,F403
from bam_models.tasks.detection import __all__  # noqa: F401
