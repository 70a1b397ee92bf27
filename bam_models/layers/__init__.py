from .bam import BAM, BamChannelGate, BamSpatialGate, DilatedConv2d, GateBatchNorm2d, space_to_batch_conv2d
from .cbam import CBAM, CbamChannelGate, CbamSpatialGate
