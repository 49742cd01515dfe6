"""Registers LOUPE with the transformers Auto classes, in-process and for remote-code loading."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)

from .configuration_loupe import LoupeConfig, LoupeVisionConfig
from .image_processing_loupe import LoupeImageProcessor, LoupeImageProcessorTorchvision
from .modeling_loupe import LoupeForZeroShotDetection, LoupeModel
from .processing_loupe import LoupeProcessor


def register_loupe_auto_classes() -> None:
    """Idempotent: safe to call more than once (e.g. on re-import)."""
    AutoConfig.register(LoupeConfig.model_type, LoupeConfig, exist_ok=True)
    AutoConfig.register(LoupeVisionConfig.model_type, LoupeVisionConfig, exist_ok=True)
    AutoModel.register(LoupeConfig, LoupeModel, exist_ok=True)
    AutoModelForZeroShotObjectDetection.register(
        LoupeConfig, LoupeForZeroShotDetection, exist_ok=True
    )
    AutoModelForZeroShotImageClassification.register(LoupeConfig, LoupeModel, exist_ok=True)
    AutoImageProcessor.register(
        LoupeConfig,
        image_processor_classes={
            "pil": LoupeImageProcessor,
            "torchvision": LoupeImageProcessorTorchvision,
        },
        exist_ok=True,
    )
    AutoProcessor.register(LoupeConfig, LoupeProcessor, exist_ok=True)
    # Saved checkpoints carry their code and an `auto_map`, so `trust_remote_code=True` loads them in
    # a process that never imported loupe_hf.
    LoupeConfig.register_for_auto_class()
    LoupeModel.register_for_auto_class("AutoModel")
    LoupeForZeroShotDetection.register_for_auto_class("AutoModelForZeroShotObjectDetection")
    LoupeImageProcessor.register_for_auto_class("AutoImageProcessor")
    LoupeImageProcessorTorchvision.register_for_auto_class("AutoImageProcessor")
    LoupeProcessor.register_for_auto_class("AutoProcessor")
