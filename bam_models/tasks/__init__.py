""" Zoo backbones in downstream tasks: detection builders (`detection`) and their training loop
(`detection_train`). """
