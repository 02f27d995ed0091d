"""Image features replace <image> positions; several images per sample; the cached-feature path."""

import pytest
import torch
from PIL import Image

from model.conversation import tokenize_conversation
from model.vision import preprocess_images


def _two_image_sample(tokenizer, n_tokens):
    conv = [
        {"from": "human", "value": "<image>\nCompare with <image> please."},
        {"from": "gpt", "value": "They differ."},
    ]
    return tokenize_conversation(conv, tokenizer, "v1", 2, n_tokens, max_length=256)


def test_multi_image_features_land_on_their_placeholders(tiny_mm):
    model, tokenizer, _ = tiny_mm
    n = model.config.num_image_tokens
    sample = _two_image_sample(tokenizer, n)
    ids = torch.tensor([sample.input_ids])
    features = torch.randn(2, n, model.config.vision_config.hidden_size)
    merged = model.merge_image_features(ids, model.project(features))
    positions = (ids[0] == model.config.image_token_id).nonzero().flatten()
    assert len(positions) == 2 * n
    projected = model.project(features).reshape(2 * n, -1)
    assert torch.allclose(merged[0, positions], projected)
    # the two runs are in order: image 0 first, image 1 second, text between them untouched
    first, second = positions[:n], positions[n:]
    assert torch.allclose(merged[0, first], model.project(features[:1])[0])
    assert torch.allclose(merged[0, second], model.project(features[1:])[0])
    text_pos = (ids[0] != model.config.image_token_id).nonzero().flatten()
    assert torch.equal(merged[0, text_pos], model.get_input_embeddings()(ids[0, text_pos]))
    assert second[0] - first[-1] > 1  # text separates the images


def test_batch_of_samples_with_different_image_counts(tiny_mm):
    model, tokenizer, _ = tiny_mm
    n = model.config.num_image_tokens
    two = _two_image_sample(tokenizer, n)
    one = tokenize_conversation(
        [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}], tokenizer, "v1", 1, n, 256
    )
    width = max(len(two.input_ids), len(one.input_ids))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([two.input_ids + [pad] * (width - len(two.input_ids)),
                        one.input_ids + [pad] * (width - len(one.input_ids))])
    mask = (torch.arange(width)[None] < torch.tensor([[len(two.input_ids)], [len(one.input_ids)]])).long()
    features = torch.randn(3, n, model.config.vision_config.hidden_size)
    batched = model(input_ids=ids, attention_mask=mask, image_features=features).logits
    alone = model(input_ids=torch.tensor([one.input_ids]), image_features=features[2:]).logits
    assert torch.allclose(batched[1, : len(one.input_ids)], alone[0], atol=1e-4)


def test_placeholder_count_mismatch_is_a_clear_error(tiny_mm):
    model, tokenizer, _ = tiny_mm
    n = model.config.num_image_tokens
    ids = torch.tensor([_two_image_sample(tokenizer, n).input_ids])
    with pytest.raises(ValueError, match="image placeholders do not match images.*1 images were given"):
        model(input_ids=ids, image_features=torch.randn(1, n, model.config.vision_config.hidden_size))
    with pytest.raises(ValueError, match="no pixel_values or image_features"):
        model(input_ids=ids)


def test_pixel_path_equals_cached_feature_path(tiny_mm):
    model, tokenizer, processor = tiny_mm
    images = [Image.new("RGB", (90, 40), (200, 10, 10)), Image.new("RGB", (30, 70), (10, 10, 200))]
    pixels = preprocess_images(images, processor)
    sample = _two_image_sample(tokenizer, model.config.num_image_tokens)
    ids = torch.tensor([sample.input_ids])
    labels = torch.tensor([sample.labels])
    with torch.no_grad():
        via_pixels = model(input_ids=ids, pixel_values=pixels, labels=labels)
        features = model.encode_images(pixels)
        via_features = model(input_ids=ids, image_features=features, labels=labels)
        # features mode stores fp16; int8 activation rounding may flip a few codes, the loss barely moves
        via_fp16 = model(input_ids=ids, image_features=features.half(), labels=labels)
    assert features.shape == (2, 16, 64)
    assert torch.allclose(via_pixels.logits, via_features.logits, atol=1e-6)
    assert abs(via_pixels.loss.item() - via_fp16.loss.item()) < 1e-2


def test_features_come_from_second_to_last_layer_without_cls(tiny_mm):
    model, _, processor = tiny_mm
    pixels = preprocess_images([Image.new("RGB", (64, 64), (0, 255, 0))], processor)
    with torch.no_grad():
        hidden = model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = model.encode_images(pixels)
    assert torch.equal(feats, hidden[-2][:, 1:])


def test_generate_with_images_uses_kv_cache_consistently(tiny_mm):
    model, tokenizer, processor = tiny_mm
    pixels = preprocess_images([Image.new("RGB", (64, 64), (0, 0, 255))], processor)
    prompt = tokenize_conversation(
        [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "x"}],
        tokenizer, "v1", 1, 16, 256).input_ids[:-2]
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq, pixel_values=pixels, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    # the image changes the answer distribution: a different image gives different logits
    other = preprocess_images([Image.new("RGB", (64, 64), (255, 255, 0))], processor)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        b = model(input_ids=ids, pixel_values=other).logits[0, -1]
    assert not torch.allclose(a, b)


def test_text_only_training_batch_gives_the_projector_zero_gradients(tiny_mm):
    """Data-parallel ranks reduce the same parameters every step: a text-only batch must not drop the projector."""
    model, tokenizer, _ = tiny_mm
    sample = tokenize_conversation([{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "five"}],
                                   tokenizer, "v1", 0, model.config.num_image_tokens, 256)
    ids, labels = torch.tensor([sample.input_ids]), torch.tensor([sample.labels])
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
    finally:
        model.eval()
    for name, param in model.multi_modal_projector.named_parameters():
        assert param.grad is not None, name
        assert torch.count_nonzero(param.grad) == 0, name
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    with torch.no_grad():  # and the loss is exactly the text-only loss
        assert torch.equal(model(input_ids=ids, labels=labels).loss, loss.detach())
    model.zero_grad(set_to_none=True)


def test_gradients_become_ready_in_the_same_order_with_and_without_images(tiny_mm):
    """ZeRO fills its gradient-reduce buckets in the order gradients become ready: a text-only rank and an
    image rank must produce that order identically, or the reduced buckets would mix different parameters."""
    model, tokenizer, _ = tiny_mm
    n = model.config.num_image_tokens

    def ready_order(conversation, n_images):
        sample = tokenize_conversation(conversation, tokenizer, "v1", n_images, n, 256)
        kwargs = {"image_features": torch.randn(n_images, n, model.config.vision_config.hidden_size)} \
            if n_images else {}
        order = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
                 for name, p in model.named_parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        model.train()
        try:
            model(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels]),
                  **kwargs).loss.backward()
        finally:
            model.eval()
            for h in hooks:
                h.remove()
            model.zero_grad(set_to_none=True)
        return order

    text = ready_order([{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "five"}], 0)
    image = ready_order([{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}], 1)
    assert any(name.startswith("multi_modal_projector") for name in text)
    assert text == image
