import pytest
import torch

from fptq.quant.static_scale import OBSERVERS, SAMPLED_OBSERVERS, choose_static_scale


def test_sampled_observers_are_the_ones_that_need_a_sample():
    """The pipeline samples calibration activations only for ``SAMPLED_OBSERVERS``: every other observer
    must work from the maxima alone, and each of these must refuse to run without a sample."""
    maxes = torch.tensor([3.0, 4.0])
    for obs in OBSERVERS:
        if obs in SAMPLED_OBSERVERS:
            with pytest.raises(ValueError):
                choose_static_scale(obs, 4.0, sample=None, window_maxes=maxes, weight=torch.ones(2, 2))
        else:
            assert choose_static_scale(obs, 4.0, sample=None, window_maxes=maxes) > 0
