from .bam import BAM, BamChannelGate, BamSpatialGate, GateBatchNorm2d
from .cbam import CBAM, CbamChannelGate, CbamSpatialGate
