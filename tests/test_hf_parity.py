"""The transformers conventions OWL-ViT users rely on: tower outputs with hidden states and attentions,
`attn_implementation`, and one user script that runs unchanged on OWL-ViT and on LOUPE."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    CLIPTokenizer,
    OwlViTConfig,
    OwlViTForObjectDetection,
    OwlViTImageProcessor,
    OwlViTProcessor,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection, LoupeModel
from loupe_hf.modeling_loupe import rewrap_pipeline_hypothesis


def _model_inputs(batch) -> dict:
    return {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}


def test_towers_return_hidden_states_and_attentions_when_asked(tiny_model, tiny_batch):
    config = tiny_model.config
    with torch.no_grad():
        out = tiny_model(
            **_model_inputs(tiny_batch), output_hidden_states=True, output_attentions=True
        )
    vision, text = out.vision_model_output, out.text_model_output
    assert isinstance(vision, BaseModelOutputWithPooling)
    assert isinstance(text, BaseModelOutputWithPooling)
    assert len(vision.hidden_states) == len(config.vision_config.depths) + 1
    assert len(vision.attentions) == sum(config.vision_config.depths)
    assert len(text.hidden_states) == config.text_config.num_hidden_layers + 1
    assert len(text.attentions) == config.text_config.num_hidden_layers
    torch.testing.assert_close(vision.last_hidden_state, out.patch_tokens)
    torch.testing.assert_close(text.last_hidden_state, out.word_tokens)
    torch.testing.assert_close(text.hidden_states[-1], out.word_tokens)
    for stage, probs in zip(
        _stage_of_each_block(config.vision_config.depths), vision.attentions, strict=True
    ):
        assert probs.shape[1] == config.vision_config.num_heads[stage]
        assert probs.shape[-1] == probs.shape[-2]
    for probs in (*vision.attentions, *text.attentions):
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def _stage_of_each_block(depths) -> list[int]:
    return [stage for stage, depth in enumerate(depths) for _ in range(depth)]


def test_asking_for_attentions_changes_no_result(tiny_model, tiny_batch):
    """Recording attentions runs timm's and BERT's unfused paths: they must compute the same thing."""
    inputs = _model_inputs(tiny_batch)
    with torch.no_grad():
        plain = tiny_model(**inputs)
        recorded = tiny_model(**inputs, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(recorded.logits_per_image, plain.logits_per_image)
    torch.testing.assert_close(recorded.region_embeds, plain.region_embeds)
    assert plain.vision_model_output.attentions is None
    assert plain.text_model_output.hidden_states is None
    # Fused kernels are restored afterwards.
    assert tiny_model.text_model.config._attn_implementation == "sdpa"


def test_config_switches_are_the_defaults(tiny_config, tiny_batch):
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.output_hidden_states = True
    model = LoupeModel(config).eval()
    with torch.no_grad():
        out = model(**_model_inputs(tiny_batch))
    assert out.vision_model_output.hidden_states is not None
    assert out.text_model_output.hidden_states is not None
    assert out.text_model_output.attentions is None


def test_detector_returns_the_tower_outputs_of_the_scored_queries(tiny_config, processor):
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.set_prompt_template(processor.tokenizer)
    detector = LoupeForZeroShotDetection(config).eval()
    inputs = processor(text=[["star", "circle"]], images=Image.new("RGB", (40, 30), "red"))
    with torch.no_grad():
        out = detector(**inputs, output_hidden_states=True, output_attentions=True)
    text = out.text_model_output
    assert len(text.hidden_states) == config.text_config.num_hidden_layers + 1
    # The text tower saw the queries wrapped in the prompt: longer than the bare labels.
    assert text.last_hidden_state.shape[1] > inputs["input_ids"].shape[1]
    assert out.vision_model_output.attentions is not None


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_is_accepted_and_agrees(
    tiny_model, tiny_batch, tmp_path, implementation
):
    tiny_model.save_pretrained(tmp_path)
    loaded = LoupeModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert loaded.text_model.config._attn_implementation == implementation
    inputs = _model_inputs(tiny_batch)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs).logits_per_image,
            tiny_model(**inputs).logits_per_image,
            atol=1e-5,
            rtol=1e-5,
        )


def test_only_the_pipelines_default_hypothesis_is_rewrapped(tiny_config, processor):
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.set_prompt_template(processor.tokenizer)
    texts = [
        "This is a photo of red star.",
        "a red star",
        "This is a photo of.",
        "an image of a red star.",
    ]
    batch = processor.tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = rewrap_pipeline_hypothesis(config, batch["input_ids"], batch["attention_mask"])
    expected = processor.tokenizer(
        ["an image of a red star.", *texts[1:]], padding=True, return_tensors="pt"
    )
    width = expected["input_ids"].shape[1]
    assert ids[:, :width].tolist() == expected["input_ids"].tolist()
    assert mask[:, :width].tolist() == expected["attention_mask"].tolist()
    assert not mask[:, width:].any()


# --- one user script, OWL-ViT and LOUPE -------------------------------------------------------------


def owlvit_checkpoint(path) -> None:
    """A random-init OWL-ViT with a character-level CLIP tokenizer (nothing downloaded)."""
    vocab = {}
    for char in "abcdefghijklmnopqrstuvwxyz.,":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    # Special tokens last, as in CLIP: OWL-ViT treats a query whose first id is 0 as padding.
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = OwlViTConfig(
        text_config={
            **small,
            "vocab_size": len(vocab),
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={**small, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).save_pretrained(path)
    size = {"height": 32, "width": 32}
    OwlViTProcessor(
        image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tokenizer
    ).save_pretrained(path)


def owlvit_user_script(checkpoint: str, image: Image.Image) -> dict:
    """What a user of OWL-ViT writes (transformers' OWL-ViT docs), returning what it got."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()
    text_labels = [["a cat", "a dog"]]
    inputs = processor(text=text_labels, images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True, output_attentions=True)
    target_sizes = torch.tensor([(image.height, image.width)])
    positional = processor.post_process_grounded_object_detection(
        outputs, 0.0, target_sizes, text_labels
    )
    keywords = processor.post_process_grounded_object_detection(
        outputs=outputs, threshold=0.0, target_sizes=target_sizes, text_labels=text_labels
    )
    plain = processor.image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=target_sizes
    )
    detector = pipeline("zero-shot-object-detection", model=checkpoint)
    piped = detector(image, candidate_labels=["cat", "dog"], threshold=0.0, top_k=3)
    return {
        "outputs": outputs,
        "positional": positional,
        "keywords": keywords,
        "plain": plain,
        "pipeline": piped,
    }


def structure(got: dict) -> dict:
    """The shape of what the script got, without the values (which differ between models)."""
    outputs = got["outputs"]
    towers = {}
    for name in ("vision_model_output", "text_model_output"):
        tower = outputs[name]
        towers[name] = {
            "type": type(tower).__name__,
            "fields": [key for key in ("last_hidden_state", "pooler_output") if key in tower],
            "hidden_states": bool(tower.hidden_states),
            "attentions": bool(tower.attentions),
        }

    def result_keys(results):
        return [
            {key: type(value).__name__ for key, value in sorted(result.items())}
            for result in results
        ]

    return {
        "logits": (outputs.logits.dim(), outputs.logits.shape[0], outputs.logits.shape[-1]),
        "pred_boxes": (outputs.pred_boxes.shape[0], outputs.pred_boxes.shape[-1]),
        "boxes_match_logits": outputs.pred_boxes.shape[1] == outputs.logits.shape[1],
        "embeds": [key for key in ("text_embeds", "image_embeds") if key in outputs],
        "towers": towers,
        "positional": result_keys(got["positional"]),
        "keywords": result_keys(got["keywords"]),
        "plain": result_keys(got["plain"]),
        "pipeline": (sorted(got["pipeline"][0]), sorted(got["pipeline"][0]["box"])),
    }


@pytest.mark.slow
def test_an_owlvit_user_script_runs_unchanged_on_loupe(tmp_path, tiny_config, processor):
    owl_dir, loupe_dir = tmp_path / "owlvit", tmp_path / "loupe"
    owl_dir.mkdir()
    owlvit_checkpoint(owl_dir)
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.set_prompt_template(processor.tokenizer)
    LoupeForZeroShotDetection(config).save_pretrained(loupe_dir)
    processor.save_pretrained(loupe_dir)
    image = Image.new("RGB", (64, 48), "red")

    owl, loupe = owlvit_user_script(str(owl_dir), image), owlvit_user_script(str(loupe_dir), image)
    assert structure(loupe) == structure(owl)
    assert len(owl["positional"][0]["scores"]) > 0 and len(loupe["positional"][0]["scores"]) > 0
    # The positional (OWL-ViT order) and keyword calls mean the same thing on LOUPE.
    for by_position, by_keyword in zip(loupe["positional"], loupe["keywords"], strict=True):
        torch.testing.assert_close(by_position["scores"], by_keyword["scores"])
    assert loupe["positional"][0]["text_labels"][0] in ("a cat", "a dog")
