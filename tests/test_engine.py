"""Training loop: reproducible batches, checkpoints, and resuming to the same result."""

from __future__ import annotations

import pytest
import torch

import dmgrd
from dmgrd.engine import Results, category_metrics
from dmgrd.metrics import compute_metrics
from dmgrd.models.training import StepBatchSampler


def tiny_data(count=7):
    return [{"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))} for i in range(count)]


def new_model():
    torch.manual_seed(0)
    return dmgrd.DMGRD("efficientnet_lite0", weights=None, image_size=64, memory_size=3, texture_count=4,
                       ssot_points=32)


def test_batches_depend_only_on_seed_and_step():
    whole = list(StepBatchSampler(10, 3, seed=4, start=0, steps=9))
    tail = list(StepBatchSampler(10, 3, seed=4, start=5, steps=9))
    assert tail == whole[5:]
    epoch = [i for batch in whole[:3] for i in batch]
    assert len(set(epoch)) == 9  # no repeats within an epoch
    assert list(StepBatchSampler(10, 3, seed=5, start=0, steps=9)) != whole


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    data = tiny_data()
    reference = new_model()
    expected = reference.fit(data, steps=6, batch_size=2, progress=False)

    interrupted = new_model()
    calls = {"n": 0}
    original = interrupted.training_losses

    def crash_at_step_4(images, generator):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(images, generator)

    interrupted.training_losses = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(data, steps=6, batch_size=2, progress=False, checkpoint=tmp_path / "ck.pt",
                        checkpoint_every=2)
    resumed = new_model()
    history = resumed.fit(data, steps=6, batch_size=2, progress=False, checkpoint=tmp_path / "ck.pt", resume=True)
    assert history == expected
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)  # unset thresholds are NaN


def test_resume_needs_a_matching_checkpoint(tmp_path):
    data = tiny_data()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        new_model().fit(data, steps=2, batch_size=2, progress=False, checkpoint=tmp_path / "none.pt", resume=True)
    new_model().fit(data, steps=1, batch_size=2, progress=False, checkpoint=tmp_path / "ck.pt")
    torch.manual_seed(0)
    other = dmgrd.DMGRD("efficientnet_lite0", weights=None, image_size=64, memory_size=3, texture_count=4,
                        ssot_points=16)
    with pytest.raises(ValueError, match="different configuration"):
        other.fit(data, steps=2, batch_size=2, progress=False, checkpoint=tmp_path / "ck.pt", resume=True)
    rd4ad = dmgrd.RD4AD("efficientnet_lite0", weights=None, image_size=64)
    with pytest.raises(ValueError, match=r"ck.pt is not a rd4ad training checkpoint"):
        rd4ad.fit(data, steps=2, batch_size=2, progress=False, checkpoint=tmp_path / "ck.pt", resume=True)


def test_nan_images_are_rejected():
    data = tiny_data()
    data[2]["image"][0, 0, 0] = float("nan")
    model = dmgrd.RD4AD("efficientnet_lite0", weights=None, image_size=64)
    with pytest.raises(ValueError, match="NaN"):
        model.fit(data, steps=8, batch_size=7, progress=False)


def test_category_metrics_are_those_of_each_category_alone():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(6, 1, 8, 8, generator=g) > 0.7).float()
    masks[[0, 3]] = 0
    results = Results(torch.rand(6, generator=g), torch.tensor([0, 1, 1, 0, 1, 1]), torch.rand(6, 1, 8, 8, generator=g),
                      masks, [str(i) for i in range(6)], ["a", "a", "a", "b", "b", "b"])
    per_category = category_metrics(results)
    assert list(per_category) == ["a", "b"]
    assert per_category["b"] == compute_metrics(results.scores[3:], results.labels[3:], results.maps[3:], masks[3:])
    assert per_category["a"] != per_category["b"]
    single = Results(results.scores, results.labels, results.maps, results.masks, results.paths)
    assert category_metrics(single) == {}
    with pytest.raises(ValueError, match="no results of category 'c'"):
        results.of_category("c")
