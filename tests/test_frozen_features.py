"""Frozen features once: a linear probe (no augmentation, a frozen image tower) encodes each training image
once per fit, alone, and trains on exactly those features."""
import pytorch_lightning as pl
import torch
from open_clip.model import CLIP

from conftest import FAST, compose_cfg
from saft.app import run


def _fit(tmp_path, overrides, monkeypatch, check=True):
    calls = []
    encode = CLIP.encode_image

    def counting(self, images, normalize=False):
        calls.append((self.training, len(images)))
        return encode(self, images, normalize=normalize)
    monkeypatch.setattr(CLIP, "encode_image", counting)
    checks = []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            with torch.no_grad():
                cached = module._image_features(batch[0])
                alone = torch.cat([encode(module.model, image[None], normalize=True) for image in batch[0]])
            checks.append(torch.equal(cached, alone))
    cfg = compose_cfg(tmp_path, FAST + ["method=linear_probe", "eval_zeroshot=false", "trainer.max_steps=9"]
                      + overrides)
    datamodule, module = run.build(cfg)
    trainer = pl.Trainer(accelerator="cpu", max_steps=9, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Check()] if check else [],
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return module, datamodule, calls, checks


def test_a_probe_encodes_each_training_image_once_and_trains_on_those_exact_features(tmp_path, monkeypatch):
    module, datamodule, calls, checks = _fit(tmp_path, [], monkeypatch)
    images = len(datamodule.split["train"])
    steps_per_epoch = -(-images // 8)
    assert 9 > 2 * steps_per_epoch  # three epochs: the second and third are served from the cache
    in_training = [n for training, n in calls if training]
    assert in_training == [1] * images  # one call per image, each alone, all in the first epoch
    assert len(checks) == 9 and all(checks)  # bit-identical to encoding the image again
    assert module._features is None  # released when the fit ends


def test_augmented_or_trained_towers_recompute_every_step(tmp_path, monkeypatch):
    _, _, calls, _ = _fit(tmp_path, ["method.augment=null"], monkeypatch, check=False)
    assert [n for training, n in calls if training] == [8] * 9  # the probe on augmented images: no cache


def test_image_keys_tell_dtypes_and_shapes_apart_and_take_bf16():
    from saft.app.module import _image_key
    image = torch.rand(3, 4, 4)
    assert _image_key(image) == _image_key(image.clone())
    assert len({_image_key(image), _image_key(image.to(torch.bfloat16)), _image_key(image.reshape(3, 2, 8)),
                _image_key(image + 1e-6)}) == 4
