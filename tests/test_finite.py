"""The non-finite watch on its own: losses and weights noted on the device, the earliest bad
step over all ranks (accelerate's element-wise max reduction stands in for the other rank)."""
import torch

from resnet.train.finite import NonFiniteWatch


def _ranks_reduce(other: NonFiniteWatch):
    """accelerate's reduce(t, "max") over this rank and `other` (which negates the same way)."""
    return lambda t: torch.maximum(t, -other.first)


def test_the_first_bad_step_over_ranks_is_the_minimum_not_the_maximum():
    params = [torch.ones(3), torch.zeros(2)]
    rank0, rank1 = NonFiniteWatch(torch.device("cpu")), NonFiniteWatch(torch.device("cpu"))
    for step in range(1, 7):
        rank0.note(step, torch.tensor(float("nan") if step >= 5 else 1.0), params)
        rank1.note(step, torch.tensor(float("inf") if step >= 3 else 1.0), params)
    assert rank0.earliest(_ranks_reduce(rank1)) == "non-finite loss at step 3"
    assert rank1.earliest(_ranks_reduce(rank0)) == "non-finite loss at step 3"


def test_a_finite_loss_with_non_finite_gradients_is_caught_by_the_weights_it_made():
    weight = torch.ones(4, requires_grad=True)
    watch = NonFiniteWatch(torch.device("cpu"))
    for step in (1, 2, 3):
        loss = (weight * 2).sum()
        loss.backward()
        if step == 2:
            weight.grad.fill_(float("inf"))  # inf gradients, finite loss
        with torch.no_grad():
            weight -= 0.1 * weight.grad
        weight.grad = None
        watch.note(step, loss, [weight])
    assert watch.earliest(lambda t: t) == ("non-finite gradients at step 2 (the loss was "
                                          "finite; the update made the weights non-finite)")


def test_nothing_bad_is_none_and_large_finite_weights_are_fine():
    watch = NonFiniteWatch(torch.device("cpu"))
    watch.note(1, torch.tensor(2.0), [torch.full((3,), 3e38)])  # max |x|: no overflow
    assert watch.earliest(lambda t: t) is None
