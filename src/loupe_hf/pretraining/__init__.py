"""LOUPE pre-training (METHOD §3): the model with its objectives, the interaction labels, UNSIL,
the data collator and the Trainer.

Data flows one way through it: the collator batches images and captions, `LoupeForPreTraining`
encodes them and builds the games, `labels` turns game values (sampled or predicted by `unsil`)
into the TSA/FSA labels, `loupe_hf.losses` scores them, and `LoupeTrainer` runs the loop.
"""

from .collator import CorruptSampleError, LoupeDataCollator
from .modeling_pretraining import LoupeForPreTraining, LoupePreTrainingOutput
from .trainer import LoupeTrainer, LoupeTrainingArguments

__all__ = [
    "CorruptSampleError",
    "LoupeDataCollator",
    "LoupeForPreTraining",
    "LoupePreTrainingOutput",
    "LoupeTrainer",
    "LoupeTrainingArguments",
]
