"""The LOUPE losses on hand-checked cases."""

from __future__ import annotations

import math

import pytest
import torch

from loupe_hf.losses import cmc_loss, fsa_loss, region_phrase_logits, tsa_loss
from loupe_hf.pretraining.labels import normalize_interactions


def test_cmc_loss_is_symmetric_infonce_by_hand():
    image = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1
    )
    text = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]), dim=-1)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * image @ text.t()
    by_hand = 0.0
    for i in range(3):
        row = logits[i] - torch.logsumexp(logits[i], 0)
        column = logits[:, i] - torch.logsumexp(logits[:, i], 0)
        by_hand -= (row[i] + column[i]) / 6
    torch.testing.assert_close(cmc_loss(image, text, scale), by_hand)


def test_hard_negatives_join_the_image_to_text_direction_only_by_hand():
    generator = torch.Generator().manual_seed(0)
    image, text, negative = (
        torch.nn.functional.normalize(torch.randn(3, 4, generator=generator), dim=-1)
        for _ in range(3)
    )
    mask = torch.tensor([True, False, True])
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * image @ text.t()
    extra = 10.0 * image @ negative[mask].t()  # the masked-out negative is no column at all
    by_hand = 0.0
    for i in range(3):
        row = torch.cat([logits[i], extra[i]])
        by_hand -= (row[i] - torch.logsumexp(row, 0)) / 6
        by_hand -= (logits[i, i] - torch.logsumexp(logits[:, i], 0)) / 6
    got = cmc_loss(image, text, scale, negative_text_embeds=negative, negative_mask=mask)
    torch.testing.assert_close(got, by_hand)
    # A negative that matches its image better than the true caption raises the loss.
    assert cmc_loss(image, text, scale, negative_text_embeds=image) > cmc_loss(image, text, scale)
    none_left = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(
        cmc_loss(image, text, scale, negative_text_embeds=negative, negative_mask=none_left),
        cmc_loss(image, text, scale),
    )


def test_cmc_loss_is_small_for_perfectly_matched_pairs():
    embeds = torch.eye(4)
    assert cmc_loss(embeds, embeds, torch.tensor(math.log(100.0))) < 1e-3
    assert cmc_loss(embeds, embeds.roll(1, 0), torch.tensor(math.log(100.0))) > 10


def test_minmax_normalisation_maps_each_image_to_unit_range():
    values = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -5.0, -5.0]])
    normalized = normalize_interactions(values)
    torch.testing.assert_close(normalized, torch.tensor([[0.0, 1.0, 0.5], [0.5, 0.5, 0.5]]))


def test_normalisation_ignores_invalid_targets():
    values = torch.tensor([[[1.0, 100.0], [3.0, -100.0]]])
    valid = torch.tensor([[[True, False], [True, False]]])
    normalized = normalize_interactions(values, valid, dims=2)
    torch.testing.assert_close(normalized, torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]))


def test_sigmoid_normalisation_is_monotone_and_centred():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    normalized = normalize_interactions(values, method="sigmoid")
    assert normalized[0, 1] == pytest.approx(0.5)
    assert normalized[0, 0] < normalized[0, 1] < normalized[0, 2]
    with pytest.raises(ValueError, match="interaction normalization must be one of"):
        normalize_interactions(values, method="softmax")


def test_tsa_loss_is_binary_cross_entropy_of_confidences():
    logits = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([[1.0, 0.25]])
    p = torch.sigmoid(torch.tensor(2.0))
    expected = (-math.log(0.5) - (0.25 * torch.log(p) + 0.75 * torch.log(1 - p))) / 2
    torch.testing.assert_close(tsa_loss(logits, labels), expected)
    with pytest.raises(ValueError, match="expected tensors of one shape"):
        tsa_loss(logits, labels[:, :1])


def test_tsa_loss_gradient_moves_confidence_towards_the_label():
    logits = torch.zeros(1, 2, requires_grad=True)
    tsa_loss(logits, torch.tensor([[1.0, 0.0]])).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]


def test_fsa_loss_by_hand_with_a_padding_phrase():
    logits = torch.tensor([[[2.0, 0.0, 9.0], [0.0, 1.0, -9.0]]])  # K=2, M=3, phrase 2 is padding
    labels = torch.tensor([[[1.0, 0.0, 1.0], [0.5, 1.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    log_p = torch.log_softmax(logits[..., :2], dim=-1)
    expected = -(1.0 * log_p[0, 0, 0] + 0.5 * log_p[0, 1, 0] + 1.0 * log_p[0, 1, 1]) / (2 * 2)
    torch.testing.assert_close(fsa_loss(logits, labels, valid), expected)


def test_fsa_loss_skips_images_without_phrases_and_keeps_the_graph():
    logits = torch.randn(2, 3, 2, requires_grad=True)
    labels = torch.rand(2, 3, 2)
    only_first = fsa_loss(logits, labels, torch.tensor([[True, True], [False, False]]))
    torch.testing.assert_close(
        only_first, fsa_loss(logits[:1], labels[:1], torch.ones(1, 2, dtype=torch.bool))
    )
    none = fsa_loss(logits, labels, torch.zeros(2, 2, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()  # still part of the graph
    assert logits.grad is not None


def test_fsa_loss_pulls_alignment_towards_high_interaction_phrases():
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    fsa_loss(logits, torch.tensor([[[1.0, 0.0]]]), torch.ones(1, 2, dtype=torch.bool)).backward()
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 1]


def test_fsa_loss_in_both_directions_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 9.0], [0.0, 1.0, -9.0]]])  # K=2, M=3, phrase 2 is padding
    labels = torch.tensor([[[1.0, 0.0, 1.0], [0.5, 1.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    over_phrases = torch.log_softmax(logits[..., :2], dim=-1)
    over_regions = torch.log_softmax(logits[..., :2], dim=1)
    pairs = [(0, 0, 1.0), (1, 0, 0.5), (1, 1, 1.0)]
    forward = sum(w * over_phrases[0, k, j] for k, j, w in pairs)
    backward = sum(w * over_regions[0, k, j] for k, j, w in pairs)
    expected = -(forward + backward) / 2 / (2 * 2)
    torch.testing.assert_close(fsa_loss(logits, labels, valid, both_directions=True), expected)


def test_fsa_loss_in_both_directions_makes_a_phrase_choose_its_region():
    # One phrase: the region->phrase softmax is constant, only the other direction ranks regions.
    logits = torch.zeros(1, 2, 1, requires_grad=True)
    labels = torch.tensor([[[1.0], [0.0]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    fsa_loss(logits, labels, valid).backward()
    assert logits.grad.abs().sum() == 0
    logits.grad = None
    fsa_loss(logits, labels, valid, both_directions=True).backward()
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 1, 0]


def test_fsa_region_weights_scale_each_regions_terms():
    logits, labels = torch.randn(2, 3, 4), torch.rand(2, 3, 4)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    weights = torch.tensor([[0.5, 2.0, 0.0], [1.0, 1.0, 3.0]])
    torch.testing.assert_close(
        fsa_loss(logits, labels, valid, region_weights=weights),
        fsa_loss(logits, labels * weights[..., None], valid),
    )


def test_region_phrase_logits_are_scaled_dot_products():
    regions, phrases = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    logits = region_phrase_logits(regions, phrases, torch.tensor(math.log(2.0)))
    torch.testing.assert_close(logits[1, 2, 4], 2 * regions[1, 2] @ phrases[1, 4])
