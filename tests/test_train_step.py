"""Gradient accumulation must give the gradients of the whole batch, not of summed micro-batch losses."""
import torch
from open_clip.loss import ClipLoss

from vlp.models import create_model
from vlp.train.step import train_step


def _loss(image_features, text_features, logit_scale, logit_bias=None):
    return {"loss": ClipLoss()(image_features, text_features, logit_scale)}


def _grads(model, batches):
    model.zero_grad(set_to_none=True)
    losses = train_step(model, batches, _loss)
    return losses["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradients_equal_full_batch(micro_model_json):
    torch.manual_seed(0)
    model = create_model(micro_model_json).model.double()
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    texts = torch.randint(1, 400, (8, 16))
    full_loss, full = _grads(model, [(images, texts)])
    acc_loss, acc = _grads(model, [(images[i:i + 2], texts[i:i + 2]) for i in range(0, 8, 2)])
    assert torch.allclose(full_loss, acc_loss, atol=1e-12)
    assert full.keys() == acc.keys() and "logit_scale" in full
    for name in full:
        assert torch.allclose(full[name], acc[name], atol=1e-10, rtol=1e-8), name

    # The naive method (sum of per-micro-batch losses) differs: the check above can fail.
    model.zero_grad(set_to_none=True)
    for i in range(0, 8, 2):
        train_step(model, [(images[i:i + 2], texts[i:i + 2])], _loss)
    naive = model.visual.conv1.weight.grad
    assert not torch.allclose(naive, full["visual.conv1.weight"], atol=1e-6)
