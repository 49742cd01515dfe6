"""The ``zero_shot_accuracy`` metric script (load it with ``evaluate.load(<this folder>)``)."""
