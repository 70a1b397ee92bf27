from .bam import BAM, BamChannelGate, BamSpatialGate, DilatedConv2d, GateBatchNorm2d, space_to_batch_conv2d
from .cbam import CBAM, CbamChannelGate, CbamSpatialGate
from .config import FusedGatingError, fused_gating, set_fused_gating, use_fused_gating
from .gating_tuning import (
    TUNING, GatingTuning, gating_autotune, kernel_choices, set_gating_autotune, tuning_for, use_gating_autotune,
)
from .placement import (
    BAM_DILATION, attention_keys, bam_stage_indices, cbam_layer, hand_final_relu_over, stage_bam, stage_dilation,
)
