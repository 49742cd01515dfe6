"""The ``grounding_accuracy`` metric script (load it with ``evaluate.load(<this folder>)``)."""
