"""Sample-quality metrics: the classifier-feature FD/KID behave like FID/KID, Inception detection."""
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from callbacks.fid import (
    ClassifierFeatures,
    SmallClassifier,
    find_inception_weights,
    rotation_batch,
    train_classifier,
)
from datamodules.diffusion import DiffusionDataModule


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    dm = DiffusionDataModule(loader={"batch_size": 64}, cache_dir=str(tmp_path_factory.mktemp("d")), image_size=16)
    dm.prepare_data()
    dm.setup("fit")
    x = dm.train_set.images.float() / 127.5 - 1
    return x, dm.train_set.labels, dm


@pytest.fixture(scope="module")
def classifier(digits):
    x, y, _ = digits
    return train_classifier(x, y, 10, torch.device("cpu"), steps=40, width=8, lr=1e-2, seed=0)


def test_classifier_learns_the_digits(digits, classifier):
    _, _, dm = digits
    xv = dm.val_set.images.float() / 127.5 - 1
    with torch.no_grad():
        acc = (classifier(xv).argmax(1) == dm.val_set.labels).float().mean().item()
    assert acc > 0.7


def test_classifier_is_not_fooled_by_a_lifted_background(digits, classifier):
    """Under-trained samples carry a grey background; the judge must still read the digit (a
    classifier trained on clean images alone once put every such image in one class)."""
    _, _, dm = digits
    xv = dm.val_set.images.float() / 127.5 - 1
    lifted = (xv + 0.5 * (xv < -0.99).float()
              + 0.05 * torch.randn(xv.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    with torch.no_grad():
        clean = (classifier(xv).argmax(1) == dm.val_set.labels).float().mean().item()
        pred = classifier(lifted).argmax(1)
    assert (pred == dm.val_set.labels).float().mean().item() > clean - 0.1
    assert torch.bincount(pred, minlength=10).max().item() < 0.3 * len(pred)


def test_fd_of_a_set_with_itself_is_zero_and_rises_with_noise(digits, classifier):
    x, _, _ = digits
    real = x[:600]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=g)
    scores = []
    for sigma in (0.0, 0.1, 0.3, 0.6):
        fd = FrechetInceptionDistance(feature=ClassifierFeatures(classifier))
        fd.update(real, real=True)
        fd.update((real + sigma * noise).clamp(-1, 1), real=False)
        scores.append(float(fd.compute()))
    assert abs(scores[0]) < 1e-3 * max(1.0, scores[-1])
    assert scores == sorted(scores) and scores[-1] > scores[1] > 0


def test_kid_of_a_set_with_itself_is_near_zero_and_rises(digits, classifier):
    x, _, _ = digits
    real = x[:400]
    noisy = (real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    out = []
    for fake in (real, noisy):
        kid = KernelInceptionDistance(feature=ClassifierFeatures(classifier), subsets=5, subset_size=200)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        torch.manual_seed(0)
        out.append(float(kid.compute()[0]))
    assert abs(out[0]) < 0.2 * out[1]


def test_rotation_targets_for_unlabelled_data():
    x = torch.arange(4.0).view(1, 1, 2, 2).repeat(50, 1, 1, 1)
    torch.manual_seed(0)
    out, k = rotation_batch(x)
    for i in range(len(x)):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    assert set(k.tolist()) == {0, 1, 2, 3}
    model = train_classifier(torch.rand(16, 1, 8, 8) * 2 - 1, None, 0, torch.device("cpu"), steps=2, width=4)
    assert model.head[-1].out_features == 4


def test_feature_extractor_is_frozen():
    feats = ClassifierFeatures(SmallClassifier(1, 3, width=4))
    feats.train()
    assert not feats.classifier.training and not any(p.requires_grad for p in feats.parameters())
    assert feats(torch.zeros(2, 1, 8, 8)).shape == (2, 16)


def test_inception_weights_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path, why = find_inception_weights(str(tmp_path / "missing.pth"))
    assert path is None and "missing.pth" in why and "hub" in why
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    path, why = find_inception_weights(None)
    try:
        import torch_fidelity  # noqa: F401
        assert path == cached
    except ImportError:
        assert path is None and "torch-fidelity" in why and str(cached) in why


def test_the_classifier_is_trained_once_per_data_and_settings_then_loaded(digits, tmp_path, monkeypatch):
    from callbacks import sample_classifier

    x, y, _ = digits
    calls = []
    real_train = sample_classifier.train_classifier
    monkeypatch.setattr(sample_classifier, "train_classifier", lambda *a, **k: calls.append(k) or real_train(*a, **k))
    settings = {"steps": 3, "width": 8, "lr": 1e-2, "batch_size": 32}
    first = sample_classifier.cached_classifier(tmp_path, x[:64], y[:64], 10, torch.device("cpu"), seed=0, **settings)
    again = sample_classifier.cached_classifier(tmp_path, x[:64], y[:64], 10, torch.device("cpu"), seed=0, **settings)
    assert len(calls) == 1
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sample_classifier.cached_classifier(tmp_path, x[64:128], y[64:128], 10, torch.device("cpu"), seed=0, **settings)
    sample_classifier.cached_classifier(tmp_path, x[:64], y[:64], 10, torch.device("cpu"), seed=0,
                                        **{**settings, "steps": 4})
    assert len(calls) == 3                                       # other images, other settings: trained anew
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 3 and not list(tmp_path.glob("*.tmp-*"))
