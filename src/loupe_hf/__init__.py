"""LOUPE (fine-grained semantically aligned vision-language pre-training) for the Hugging Face stack.

Importing the package registers the LOUPE classes with the transformers Auto classes, so
`AutoConfig`, `AutoModel`, `AutoModelForZeroShotObjectDetection`, `AutoImageProcessor` and
`AutoProcessor` resolve `model_type="loupe"`; checkpoints are saved with their code, so they also
load with `trust_remote_code=True` where `loupe_hf` is not installed.
"""

from .auto_registration import register_loupe_auto_classes
from .configuration_loupe import LOUPE_PRESETS, LoupeConfig, LoupeVisionConfig
from .image_processing_loupe import (
    LoupeImageError,
    LoupeImageProcessor,
    LoupeImageProcessorTorchvision,
)
from .modeling_loupe import (
    LoupeForZeroShotDetection,
    LoupeModel,
    LoupeObjectDetectionOutput,
    LoupeOutput,
    LoupePreTrainedModel,
)
from .pretraining import (
    LoupeDataCollator,
    LoupeForPreTraining,
    LoupePreTrainingOutput,
    LoupeTrainer,
    LoupeTrainingArguments,
)
from .processing_loupe import LoupeProcessor
from .tokenization_loupe import train_wordpiece_tokenizer

__version__ = "0.1.0"

register_loupe_auto_classes()

__all__ = [
    "LOUPE_PRESETS",
    "LoupeConfig",
    "LoupeDataCollator",
    "LoupeForPreTraining",
    "LoupeForZeroShotDetection",
    "LoupeImageError",
    "LoupeImageProcessor",
    "LoupeImageProcessorTorchvision",
    "LoupeModel",
    "LoupeObjectDetectionOutput",
    "LoupeOutput",
    "LoupePreTrainedModel",
    "LoupePreTrainingOutput",
    "LoupeProcessor",
    "LoupeTrainer",
    "LoupeTrainingArguments",
    "LoupeVisionConfig",
    "train_wordpiece_tokenizer",
]
