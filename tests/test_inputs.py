"""What a step reads: augmentation draws, step planning, the prefetcher, and that training through it is exact."""

import math
import threading

import pytest
import torch
from ajepa.audio import apply_augmentation, draw_augmentation
from ajepa.train.inputs import Prefetcher, plan_step
from ajepa.train.pretrain import Pretrainer, patch_grid
from conftest import fake_batch, micro_cfg

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ augmentation


def test_augmentation_is_a_rolled_crop_of_real_frames_plus_a_gain():
    spec = torch.arange(6 * 40 * 3, dtype=torch.float32).view(6, 40, 3)
    n_frames = torch.tensor([40, 30, 25, 12, 16, 40])
    aug = draw_augmentation(n_frames, 40, 16, roll=True, gain_db=6.0, generator=torch.Generator().manual_seed(0))
    out = apply_augmentation(spec.half().float(), aug)
    assert out.shape == (6, 16, 3) and out.dtype == torch.float32
    starts, shifts = [], []
    for b in range(6):
        frames = aug.frames[b]
        start = int(frames.min())
        real = min(int(n_frames[b]) - start, 16)  # real frames in the crop: the roll turns only these
        shift = int((torch.arange(real) - (frames[:real] - start)).remainder(real)[0])
        assert torch.equal(frames[:real], start + (torch.arange(real) - shift) % real), "not a roll of the crop"
        assert torch.equal(frames[real:], start + torch.arange(real, 16)), "padding moved into the clip"
        assert 0 <= start <= max(int(n_frames[b]) - 16, 0), "the crop leaves the clip's real frames"
        expected = spec[b, start:start + 16].clone()
        expected[:real] = torch.roll(expected[:real], shifts=shift, dims=0)
        torch.testing.assert_close(out[b], expected + aug.gain[b], rtol=0, atol=0)
        starts.append(start)
        shifts.append(shift)
    assert starts[3] == 0  # shorter than the crop: from its first frame
    assert len(set(starts[:3])) > 1 and len(set(shifts)) > 1
    assert aug.gain.abs().max() <= 6.0 * math.log(10) / 10 and aug.gain.std() > 0


def test_augmentation_off_and_short_store_pads():
    spec = torch.randn(2, 10, 4)
    aug = draw_augmentation(torch.tensor([10, 7]), 10, 16, roll=False, gain_db=0.0,
                            generator=torch.Generator().manual_seed(0))
    out = apply_augmentation(spec, aug)
    assert out.shape == (2, 16, 4)
    assert torch.equal(out[:, :10], spec) and torch.all(out[:, 10:] == 0)


def test_augmentation_draws_follow_the_generator():
    draw = lambda seed: draw_augmentation(torch.tensor([98] * 4), 128, 64, True, 6.0,  # noqa: E731
                                          torch.Generator().manual_seed(seed))
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.gain, b.gain)
    assert not torch.equal(a.frames, c.frames)


# ---------------------------------------------------------------------------------------------- planning


def test_plan_is_a_pure_function_of_step_rank_and_data():
    cfg = micro_cfg("optim.grad_accum=2")
    grid = patch_grid(cfg)
    data = [fake_batch(0), fake_batch(1)]
    one, again = plan_step(cfg, grid, 0, 5, data), plan_step(cfg, grid, 0, 5, data)
    for x, y in zip(one, again, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(x.tensors(), y.tensors(), strict=True))
    other_rank = plan_step(cfg, grid, 1, 5, data)
    assert [m.family for m in other_rank] == [m.family for m in one]  # ranks agree on family and sizes
    assert other_rank[0].targets.shape == one[0].targets.shape
    assert not torch.equal(other_rank[0].targets, one[0].targets)  # positions differ per rank
    assert not torch.equal(one[0].context, one[1].context)  # and per micro-batch
    assert one[0].step == 5 and 0 < one[0].context_fraction < 1 and 0 < one[0].target_fraction < 1


def test_train_step_refuses_micro_batches_of_another_step():
    trainer = Pretrainer(micro_cfg(), -8.0, 4.0, CPU)
    planned = trainer.plan(3, [fake_batch(0)])
    with pytest.raises(ValueError, match="planned for step 3, trainer is at 0"):
        trainer.train_step(planned)


# -------------------------------------------------------------------------------------------- prefetcher


def test_prefetcher_yields_each_step_planned_in_order_then_stops():
    cfg = micro_cfg("optim.grad_accum=2")
    grid = patch_grid(cfg)
    data = [fake_batch(i) for i in range(6)]
    with Prefetcher(lambda s, b: plan_step(cfg, grid, 0, s, b), iter(data), 2, 7, CPU) as stream:
        steps = list(stream)
        with pytest.raises(StopIteration):
            next(stream)
    assert [s[0].step for s in steps] == [7, 8, 9]
    for i, step in enumerate(steps):
        expected = plan_step(cfg, grid, 0, 7 + i, data[2 * i:2 * i + 2])
        for got, want in zip(step, expected, strict=True):
            assert all(torch.equal(s, t) for s, t in zip(got.tensors(), want.tensors(), strict=True))


def test_prefetcher_raises_the_data_error_at_the_step_that_needed_it():
    def batches():
        yield fake_batch(0)
        raise OSError("shard file vanished")

    cfg = micro_cfg()
    with Prefetcher(lambda s, b: plan_step(cfg, patch_grid(cfg), 0, s, b), batches(), 1, 0, CPU) as stream:
        assert next(stream)[0].step == 0
        with pytest.raises(OSError, match="shard file vanished"):
            next(stream)


def test_prefetcher_close_stops_its_thread_on_an_endless_stream():
    cfg = micro_cfg()
    endless = iter(lambda: fake_batch(0), None)
    stream = Prefetcher(lambda s, b: plan_step(cfg, patch_grid(cfg), 0, s, b), endless, 1, 0, CPU, depth=2)
    next(stream)
    stream.close()
    assert not any(t.name == "ajepa-prefetch" and t.is_alive() for t in threading.enumerate())


def test_training_through_the_prefetcher_is_bit_identical_to_planning_in_the_step():
    batches = [fake_batch(i) for i in range(5)]
    direct = Pretrainer(micro_cfg(), -8.0, 4.0, CPU)
    for batch in batches:
        direct.train_step([batch])
    prefetched = Pretrainer(micro_cfg(), -8.0, 4.0, CPU)
    with prefetched.prefetch(iter(batches)) as stream:
        for micro_batches in stream:
            prefetched.train_step(micro_batches)
    assert prefetched.step == direct.step == 5
    for p, q in zip(prefetched.model.parameters(), direct.model.parameters(), strict=True):
        assert torch.equal(p, q)
