"""The ``retrieval_recall`` metric script (load it with ``evaluate.load(<this folder>)``)."""
