"""The backend contract suite (``tests/runtime/test_backend_contract.py``) run against a served model.

The contract's tests are imported and run here with ``backend`` a :class:`RemoteModel` of tiny-llama
on a real Ray Serve; each compares against transformers itself. Where the contract passes a Python
callable (a metric) the served model takes the same metric declared as data (:class:`TokenMetric`,
the same number); training and writing weights are refused on a shared model, and that refusal is
what is tested here for them.
"""

from __future__ import annotations

import pytest

from interplab.serve import ReadOnlyModelError, TokenMetric
from tests.runtime import test_backend_contract as contract
from tests.runtime.helpers import ANSWER, WRONG
from tests.runtime.test_backend_contract import (  # noqa: F401 - collected here, with this module's backend
    test_capture_into_a_store_equals_the_run,
    test_generate_equals_transformers_greedy,
    test_logits_and_captures_equal_transformers,
    test_mid_model_passes_equal_the_full_run,
    test_shape_config_and_stages,
    test_stage_forward_chain_equals_the_run,
    test_steering_equals_a_transformers_hook,
    test_tokens_and_sites,
)

hf = contract.hf


@pytest.fixture
def backend(remote_tiny):
    return remote_tiny


def test_gradients_equal_transformers_autograd(backend, hf, monkeypatch):
    monkeypatch.setattr(contract, "logit_diff", TokenMetric("logit_diff", answer=ANSWER, wrong=WRONG))
    contract.test_gradients_equal_transformers_autograd(backend, hf)


def test_weights_and_training_are_refused(backend):
    with pytest.raises(ReadOnlyModelError):
        backend.trainer()
    with pytest.raises(ReadOnlyModelError):
        backend.set_parameters({})
    with pytest.raises(NotImplementedError):
        backend.parameter_names()
